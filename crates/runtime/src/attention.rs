//! Causal grouped-query attention over the KV cache.
//!
//! Query head `h` reads key/value head `h / (heads / kv_heads)`. Scores are scaled by
//! `1/sqrt(head_dim)`, softmaxed in f32 with the maximum subtracted, and weight the values. Heads
//! are independent, so they are spread over the worker threads; each head owns a slice of one
//! preallocated scratch buffer (scores, outputs, f16 conversion rows), so nothing is allocated per
//! token.
//!
//! One decoded token over a long cache (more than [`SPLIT_MIN`] positions; any length for an f16
//! cache, whose rows are widened to f32 a span at a time) is split further,
//! as in flash-decoding: every (KV head, span of [`SPAN`] positions) is a task that computes, for
//! each query head of the group, the span's scores, their maximum `m`, `l = Σ exp(s − m)` and the
//! unnormalized `Σ exp(s − m)·v`; the spans of a head are then merged with weights `exp(m − M)`.
//! This spreads the work evenly over the threads (a 9-head model on 2 threads split 5/4 by heads),
//! and the query heads of a group read each span of keys and values while it is in cache. Shorter
//! contexts keep the one-pass form.
//!
//! A batch of query tokens (prefill) goes through the keys and values [`KV_BLOCK`] positions at a
//! time, flash-attention style: each block is read (an f16 one widened) once for every token of
//! the batch, and each token keeps a running maximum, sum of exps and weighted sum of values,
//! rescaled when a later block raises the maximum; no score row as long as the context is kept.

use lutra_kernels::{vector, Cpu};

use crate::kv_cache::{LayerCache, Rows};

/// Head counts and size of an attention layer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AttentionShape {
    /// Query heads.
    pub heads: usize,
    /// Key/value heads; divides `heads`.
    pub kv_heads: usize,
    /// Elements per head.
    pub head_dim: usize,
}

/// Attention with its scratch memory, sized for a context and a batch of query tokens.
#[derive(Clone, Debug)]
pub struct Attention {
    shape: AttentionShape,
    capacity: usize,
    max_batch: usize,
    /// Per query head: see [`Attention::stride`].
    scratch: Vec<f32>,
    /// Per thread's range of (KV head, span, query head) tasks: each task's `m`, `l` and
    /// `[head_dim]` partial outputs, then f32 rows converted from an f16 cache.
    spans: Vec<f32>,
}

/// Positions per task when one token's attention is split over spans of the cache.
pub(crate) const SPAN: usize = 256;

/// Key/value rows per block of the batched (prefill) path: read (an f16 cache widened to f32) once
/// for all the batch's tokens.
const KV_BLOCK: usize = 64;

/// A decoded token attends span by span once it sees more than this many positions.
pub(crate) const SPLIT_MIN: usize = 2 * SPAN;

impl Attention {
    /// Scratch for up to `max_batch` query tokens attending to up to `capacity` positions.
    pub fn new(shape: AttentionShape, capacity: usize, max_batch: usize) -> Attention {
        let mut attention = Attention {
            shape,
            capacity,
            max_batch,
            scratch: Vec::new(),
            spans: Vec::new(),
        };
        attention.scratch = vec![0.0; shape.heads * attention.stride()];
        attention
    }

    /// Scratch per query head: `[max_batch][head_dim]` outputs, `[max_batch]` running maxima and
    /// sums, the head's `[max_batch][head_dim]` queries, one block's `[max_batch][KV_BLOCK]`
    /// scores and `[max_batch][head_dim]` weighted values, and a block of keys and one of values
    /// widened from an f16 cache.
    fn stride(&self) -> usize {
        let hd = self.shape.head_dim;
        2 * self.max_batch + 3 * self.max_batch * hd + self.max_batch * KV_BLOCK + 2 * KV_BLOCK * hd
    }

    /// Attention of `n` query tokens (`q` is `[n][heads·head_dim]`) at positions `pos0..pos0+n`,
    /// whose keys and values are already in `cache`; token `t` sees positions `0..=pos0+t`, or
    /// with a sliding `window` only the last `window` of them (its own included).
    /// Writes `out` (`[n][heads·head_dim]`). Needs `n <= max_batch` and `pos0 + n <= capacity`.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn attend(
        &mut self,
        cpu: &Cpu,
        cache: LayerCache<'_>,
        q: &[f32],
        n: usize,
        pos0: usize,
        window: Option<usize>,
        out: &mut [f32],
    ) {
        let AttentionShape {
            heads,
            kv_heads,
            head_dim: hd,
        } = self.shape;
        debug_assert!(n <= self.max_batch && pos0 + n <= self.capacity);
        // An f16 cache always goes span by span (its rows are widened a span at a time); an f32
        // cache only past SPLIT_MIN, so short contexts keep the one-pass bits.
        let f16 = !matches!(cache.keys, Rows::F32(_));
        // The first position token `t` of the batch sees.
        let first = |t: usize| window.map_or(0, |w| (pos0 + t + 1).saturating_sub(w.max(1)));
        if n == 1 && (f16 || pos0 + 1 - first(0) > SPLIT_MIN) {
            return self.attend_spans(cpu, cache, q, first(0), pos0 + 1, out);
        }
        let q_dim = heads * hd;
        let group = heads / kv_heads;
        let scale = 1.0 / (hd as f32).sqrt();
        let max_batch = self.max_batch;
        let stride = self.stride();
        let head_stride = cache.head_stride;
        // Positions some token of the batch sees (`first` does not decrease with `t`).
        let (lo_all, end_all) = (first(0), pos0 + n);

        cpu.for_each_chunk(&mut self.scratch, stride, |start, chunk| {
            let h = start / stride;
            // This KV head's rows, `[position][head_dim]`, contiguous.
            let kv_start = (h / group) * head_stride;
            let (outs, rest) = chunk.split_at_mut(max_batch * hd);
            let (maxes, rest) = rest.split_at_mut(max_batch);
            let (sums, rest) = rest.split_at_mut(max_batch);
            let (queries, rest) = rest.split_at_mut(max_batch * hd);
            let (scores, rest) = rest.split_at_mut(max_batch * KV_BLOCK);
            let (block_outs, rest) = rest.split_at_mut(max_batch * hd);
            let (kbuf, vbuf) = rest.split_at_mut(KV_BLOCK * hd);
            outs[..n * hd].fill(0.0);
            maxes[..n].fill(f32::NEG_INFINITY);
            sums[..n].fill(0.0);
            // This head's query of every token, contiguous: `[n][head_dim]`.
            for (t, query) in queries[..n * hd].chunks_exact_mut(hd).enumerate() {
                query.copy_from_slice(&q[t * q_dim + h * hd..][..hd]);
            }
            // Block by block of keys and values (an f16 cache widened once per block for every
            // token), each token keeping its running maximum, sum of exps and weighted values.
            let mut p0 = lo_all;
            while p0 < end_all {
                // The tokens that see a position of the block (token t sees
                // `first(t)..=pos0 + t`; `first` does not decrease), and the block's positions
                // the last of them sees.
                let ta = p0.saturating_sub(pos0);
                let tb = (ta..n).find(|&t| first(t) >= p0 + KV_BLOCK).unwrap_or(n);
                let p1 = (p0 + KV_BLOCK).min(pos0 + tb);
                let cols = p1 - p0;
                let at = kv_start + p0 * hd;
                let k = cache.keys.read(cpu, at, cols * hd, &mut *kbuf);
                let v = cache.values.read(cpu, at, cols * hd, &mut *vbuf);
                let scores = &mut scores[..(tb - ta) * cols];
                vector::dot_matrix(cpu, &queries[ta * hd..tb * hd], k, hd, scores);
                for (t, row) in (ta..tb).zip(scores.chunks_exact_mut(cols)) {
                    // The positions token t sees in the block; the others get weight 0.
                    let (lo, seen) = (first(t).max(p0) - p0, (pos0 + t + 1).min(p1) - p0);
                    let seen_scores = &mut row[lo..seen];
                    let max = maxes[t].max(vector::scale_max(cpu, seen_scores, scale));
                    // Rescales what earlier blocks summed (0 before the first block).
                    let correction = (maxes[t] - max).exp();
                    let sum = vector::exp_sum(cpu, seen_scores, max);
                    maxes[t] = max;
                    sums[t] = sums[t] * correction + sum;
                    row[..lo].fill(0.0);
                    row[seen..].fill(0.0);
                    outs[t * hd..(t + 1) * hd]
                        .iter_mut()
                        .for_each(|o| *o *= correction);
                }
                let block_outs = &mut block_outs[..(tb - ta) * hd];
                vector::weighted_row_sums(cpu, block_outs, scores, v, hd);
                for (o, &b) in outs[ta * hd..tb * hd].iter_mut().zip(&*block_outs) {
                    *o += b;
                }
                p0 += KV_BLOCK;
            }
            for (o, &sum) in outs[..n * hd].chunks_exact_mut(hd).zip(&sums[..n]) {
                let inv = 1.0 / sum;
                o.iter_mut().for_each(|x| *x *= inv);
            }
        });

        for h in 0..heads {
            let outs = &self.scratch[h * stride..][..n * hd];
            for (t, o) in outs.chunks_exact(hd).enumerate() {
                out[t * q_dim + h * hd..][..hd].copy_from_slice(o);
            }
        }
    }
}

impl Attention {
    /// One query token (`q` is `[heads·head_dim]`) over positions `first..seen` of one layer's
    /// cache, span by span (see the module docs); writes `out` (`[heads·head_dim]`).
    fn attend_spans(
        &mut self,
        cpu: &Cpu,
        cache: LayerCache<'_>,
        q: &[f32],
        first: usize,
        seen: usize,
        out: &mut [f32],
    ) {
        let AttentionShape {
            heads,
            kv_heads,
            head_dim: hd,
        } = self.shape;
        let group = heads / kv_heads;
        let scale = 1.0 / (hd as f32).sqrt();
        let spans = (seen - first).div_ceil(SPAN);
        // Task `t` = (KV head, span, query head of its group), in that order, so the query heads
        // that read one span of keys and values run back to back on one thread.
        let stride = hd + 2;
        let tasks = kv_heads * spans * group;
        // One contiguous range of tasks per thread, so each thread's keys and values are one
        // stream. A range's scratch holds its tasks' partials, the scores of the query heads of
        // the current span, then (f16 caches) the span's keys and values converted to f32.
        let per_range = tasks.div_ceil(cpu.threads());
        let ranges = tasks.div_ceil(per_range);
        let convert = if matches!(cache.keys, Rows::F32(_)) {
            0
        } else {
            2 * SPAN * hd
        };
        let range_len = per_range * stride + group * SPAN + convert;
        // Grows once to the longest context and thread count seen, then is reused.
        if self.spans.len() < ranges * range_len {
            self.spans.resize(ranges * range_len, 0.0);
        }
        let head_stride = cache.head_stride;
        cpu.for_each_chunk(
            &mut self.spans[..ranges * range_len],
            range_len,
            |start, chunk| {
                let first_task = start / range_len * per_range;
                let end_task = (first_task + per_range).min(tasks);
                let (partials, buf) = chunk.split_at_mut(per_range * stride);
                let (scores, buf) = buf.split_at_mut(group * SPAN);
                let (kbuf, vbuf) = buf.split_at_mut(convert / 2);
                // The span whose rows are read and the first query head whose scores are held.
                let mut rows_of = None;
                let mut j0 = 0;
                let mut span_rows: (&[f32], &[f32]) = (&[], &[]);
                for (task, partial) in (first_task..end_task).zip(partials.chunks_exact_mut(stride))
                {
                    let (g, rest) = (task / (spans * group), task % (spans * group));
                    let (span, j) = (rest / group, rest % group);
                    let p0 = first + span * SPAN;
                    let len = SPAN.min(seen - p0);
                    if rows_of != Some((g, span)) {
                        // The query heads of a group share this span: read (convert) it once and
                        // score it against all of them in this range at once.
                        let at = g * head_stride + p0 * hd;
                        span_rows = (
                            cache.keys.read(cpu, at, len * hd, &mut *kbuf),
                            cache.values.read(cpu, at, len * hd, &mut *vbuf),
                        );
                        rows_of = Some((g, span));
                        j0 = j;
                        let j1 = group.min(j + (end_task - task));
                        let heads_q = &q[(g * group + j0) * hd..(g * group + j1) * hd];
                        vector::dot_matrix(
                            cpu,
                            heads_q,
                            span_rows.0,
                            hd,
                            &mut scores[..(j1 - j0) * len],
                        );
                    }
                    let scores = &mut scores[(j - j0) * len..][..len];
                    let max = vector::scale_max(cpu, scores, scale);
                    let sum = vector::exp_sum(cpu, scores, max);
                    let (ml, o) = partial.split_at_mut(2);
                    ml[0] = max;
                    ml[1] = sum;
                    vector::weighted_row_sum(cpu, o, scores, span_rows.1);
                }
            },
        );

        // Merge each head's spans: weights exp(m − M) relative to the head's largest maximum M.
        for h in 0..heads {
            let (g, j) = (h / group, h % group);
            let partial = |span: usize| {
                let task = (g * spans + span) * group + j;
                let at = task / per_range * range_len + task % per_range * stride;
                &self.spans[at..at + stride]
            };
            let top = (0..spans)
                .map(|span| partial(span)[0])
                .fold(f32::NEG_INFINITY, f32::max);
            let total: f32 = (0..spans)
                .map(|span| (partial(span)[0] - top).exp() * partial(span)[1])
                .sum();
            let o = &mut out[h * hd..(h + 1) * hd];
            o.fill(0.0);
            for span in 0..spans {
                let p = partial(span);
                let w = (p[0] - top).exp() / total;
                vector::axpy(cpu, o, w, &p[2..]);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kv_cache::KvCache;

    fn values(n: usize, seed: u64) -> Vec<f32> {
        let mut s = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (0..n)
            .map(|_| {
                s = s
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
            })
            .collect()
    }

    /// A one-layer cache holding `keys` and `values` (`[positions][kv_dim]`), and the values it
    /// holds (rounded to f16 in an f16 cache).
    fn filled_cache(
        shape: AttentionShape,
        keys: &[f32],
        vals: &[f32],
        f16: bool,
    ) -> (KvCache, Vec<f32>, Vec<f32>) {
        let total = keys.len() / (shape.kv_heads * shape.head_dim);
        let mut cache = KvCache::new(1, shape.kv_heads, shape.head_dim, total, f16);
        cache.reserve(total).unwrap();
        cache.store(0, 0, keys, vals);
        let round = |v: &[f32]| -> Vec<f32> {
            v.iter()
                .map(|&x| {
                    if f16 {
                        half::f16::from_f32(x).to_f32()
                    } else {
                        x
                    }
                })
                .collect()
        };
        (cache, round(keys), round(vals))
    }

    /// Textbook attention of one query token at `pos` over `keys`/`values` `[pos+1][kv_dim]`.
    fn naive(shape: AttentionShape, q: &[f32], keys: &[f32], vals: &[f32], pos: usize) -> Vec<f32> {
        naive_from(shape, q, keys, vals, 0, pos)
    }

    /// Textbook attention of one query token at `pos` over positions `lo..=pos`.
    fn naive_from(
        shape: AttentionShape,
        q: &[f32],
        keys: &[f32],
        vals: &[f32],
        lo: usize,
        pos: usize,
    ) -> Vec<f32> {
        let hd = shape.head_dim;
        let kv_dim = shape.kv_heads * hd;
        let mut out = vec![0.0; shape.heads * hd];
        for h in 0..shape.heads {
            let g = h * shape.kv_heads / shape.heads;
            let qh = &q[h * hd..(h + 1) * hd];
            let s: Vec<f64> = (lo..=pos)
                .map(|p| {
                    let k = &keys[p * kv_dim + g * hd..][..hd];
                    qh.iter().zip(k).map(|(a, b)| (a * b) as f64).sum::<f64>() / (hd as f64).sqrt()
                })
                .collect();
            let m = s.iter().cloned().fold(f64::MIN, f64::max);
            let e: Vec<f64> = s.iter().map(|v| (v - m).exp()).collect();
            let z: f64 = e.iter().sum();
            for (p, w) in (lo..).zip(&e) {
                for i in 0..hd {
                    out[h * hd + i] += (w / z * vals[p * kv_dim + g * hd + i] as f64) as f32;
                }
            }
        }
        out
    }

    #[test]
    fn grouped_query_attention_matches_naive_for_batches_and_threads() {
        let shape = AttentionShape {
            heads: 6,
            kv_heads: 2,
            head_dim: 20,
        };
        let (kv_dim, q_dim, total) = (40, 120, 11);
        assert_eq!(kv_dim, shape.kv_heads * shape.head_dim);
        let keys = values(total * kv_dim, 1);
        let vals = values(total * kv_dim, 2);
        let q = values(total * q_dim, 3);
        let runs = lutra_kernels::Isa::supported()
            .into_iter()
            .flat_map(|isa| [(isa, 1, false), (isa, 2, false), (isa, 1, true)]);
        for (isa, threads, f16) in runs {
            let cpu = Cpu::with_isa(isa, threads).unwrap();
            let mut cache = KvCache::new(2, shape.kv_heads, shape.head_dim, 16, f16);
            cache.reserve(total).unwrap();
            cache.store(1, 0, &keys, &vals);
            let mut attention = Attention::new(shape, 16, 8);
            // Positions 0..4 one at a time, then 4..11 as one batch (causal within the batch).
            let mut out = vec![0.0; total * q_dim];
            for pos in 0..4 {
                let o = &mut out[pos * q_dim..(pos + 1) * q_dim];
                attention.attend(&cpu, cache.layer(1), &q[pos * q_dim..], 1, pos, None, o);
            }
            let rest = &mut out[4 * q_dim..];
            attention.attend(&cpu, cache.layer(1), &q[4 * q_dim..], 7, 4, None, rest);
            let tol = if f16 { 2e-3 } else { 1e-5 };
            for pos in 0..total {
                let want = naive(shape, &q[pos * q_dim..(pos + 1) * q_dim], &keys, &vals, pos);
                for (a, b) in out[pos * q_dim..(pos + 1) * q_dim].iter().zip(&want) {
                    assert!((a - b).abs() < tol, "pos {pos}: {a} vs {b}");
                }
            }
        }
    }

    /// A batch of query tokens deep in the cache goes through several key/value blocks, the batch
    /// starting inside one; scores scaled so that later blocks raise the running maximum.
    #[test]
    fn a_batch_over_many_blocks_matches_naive() {
        let shape = AttentionShape {
            heads: 4,
            kv_heads: 2,
            head_dim: 24,
        };
        let (kv_dim, q_dim) = (48, 96);
        let (pos0, n) = (3 * KV_BLOCK + 21, 50);
        let total = pos0 + n;
        let keys: Vec<f32> = values(total * kv_dim, 11)
            .iter()
            .enumerate()
            .map(|(i, k)| k * (1.0 + 5.0 * (i / kv_dim) as f32 / total as f32))
            .collect();
        let vals = values(total * kv_dim, 12);
        let q = values(total * q_dim, 13);
        let runs = lutra_kernels::Isa::supported()
            .into_iter()
            .flat_map(|isa| [(isa, 1, false), (isa, 3, false), (isa, 2, true)]);
        for (isa, threads, f16) in runs {
            let cpu = Cpu::with_isa(isa, threads).unwrap();
            // What the cache holds (f16 rounds): the textbook attention reads the same values.
            let (cache, held_keys, held_vals) = filled_cache(shape, &keys, &vals, f16);
            let mut attention = Attention::new(shape, total, 64);
            for window in [None, Some(KV_BLOCK + 7)] {
                let mut out = vec![f32::NAN; n * q_dim];
                let qs = &q[pos0 * q_dim..];
                attention.attend(&cpu, cache.layer(0), qs, n, pos0, window, &mut out);
                for t in 0..n {
                    let pos = pos0 + t;
                    let lo = window.map_or(0, |w| (pos + 1).saturating_sub(w));
                    let qp = &q[pos * q_dim..(pos + 1) * q_dim];
                    let want = naive_from(shape, qp, &held_keys, &held_vals, lo, pos);
                    for (a, b) in out[t * q_dim..(t + 1) * q_dim].iter().zip(&want) {
                        assert!(
                            (a - b).abs() < 1e-5,
                            "{isa:?} {threads} threads f16 {f16} window {window:?} token {t}: {a} vs {b}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn long_contexts_split_into_spans_match_naive() {
        let shape = AttentionShape {
            heads: 6,
            kv_heads: 2,
            head_dim: 20,
        };
        let (kv_dim, q_dim) = (40, 120);
        // Past SPLIT_MIN, with a last span that is not full.
        let total = SPLIT_MIN + SPAN + 37;
        let keys = values(total * kv_dim, 4);
        // Scaled so that some scores dominate (the merge weights must matter).
        let keys: Vec<f32> = keys.iter().map(|k| 4.0 * k).collect();
        let vals = values(total * kv_dim, 5);
        let q = values(total * q_dim, 6);
        let runs = lutra_kernels::Isa::supported()
            .into_iter()
            .flat_map(|isa| [(isa, false), (isa, true)])
            .flat_map(|(isa, f16)| [1, 2, 3].map(|threads| (isa, f16, threads)));
        for (isa, f16, threads) in runs {
            let cpu = Cpu::with_isa(isa, threads).unwrap();
            // What the cache holds (f16 rounds): the textbook attention reads the same values.
            let (cache, held_keys, held_vals) = filled_cache(shape, &keys, &vals, f16);
            let mut attention = Attention::new(shape, total, 4);
            for pos in [0, 5, SPLIT_MIN - 1, SPLIT_MIN, SPLIT_MIN + 1, total - 1] {
                let qp = &q[pos * q_dim..(pos + 1) * q_dim];
                let mut out = vec![f32::NAN; q_dim];
                attention.attend(&cpu, cache.layer(0), qp, 1, pos, None, &mut out);
                let want = naive(shape, qp, &held_keys, &held_vals, pos);
                for (i, (a, b)) in out.iter().zip(&want).enumerate() {
                    assert!(
                        (a - b).abs() < 1e-5,
                        "{isa:?} f16 {f16}, {threads} threads, pos {pos}, element {i}: {a} vs {b}"
                    );
                }
            }
        }
    }

    #[test]
    fn sliding_window_sees_only_the_last_positions() {
        let shape = AttentionShape {
            heads: 4,
            kv_heads: 2,
            head_dim: 16,
        };
        let (kv_dim, q_dim) = (32, 64);
        let total = SPLIT_MIN + SPAN + 11;
        let keys: Vec<f32> = values(total * kv_dim, 7).iter().map(|k| 3.0 * k).collect();
        let vals = values(total * kv_dim, 8);
        let q = values(total * q_dim, 9);
        let window = SPLIT_MIN + 5;
        for f16 in [false, true] {
            let cpu = Cpu::with_isa(lutra_kernels::Isa::Scalar, 2).unwrap();
            // What the cache holds (f16 rounds): the textbook attention reads the same values.
            let (cache, held_keys, held_vals) = filled_cache(shape, &keys, &vals, f16);
            let mut attention = Attention::new(shape, total, 8);
            let check = |out: &[f32], pos: usize, w: usize| {
                let lo = (pos + 1).saturating_sub(w);
                let qp = &q[pos * q_dim..(pos + 1) * q_dim];
                let want = naive_from(shape, qp, &held_keys, &held_vals, lo, pos);
                for (a, b) in out.iter().zip(&want) {
                    assert!((a - b).abs() < 1e-5, "f16 {f16} pos {pos} window {w}");
                }
                // Leaving the window out changes the result once it cuts anything off.
                if lo > 0 {
                    let all = naive(shape, qp, &held_keys, &held_vals, pos);
                    assert!(out.iter().zip(&all).any(|(a, b)| (a - b).abs() > 1e-4));
                }
            };
            // One token at a time (one pass, then spans), and a batch past the window.
            for (pos, w) in [(3, 2), (40, 8), (total - 1, window), (total - 1, 3)] {
                let mut out = vec![f32::NAN; q_dim];
                let qp = &q[pos * q_dim..(pos + 1) * q_dim];
                attention.attend(&cpu, cache.layer(0), qp, 1, pos, Some(w), &mut out);
                check(&out, pos, w);
            }
            let (pos0, n) = (20, 8);
            let mut out = vec![f32::NAN; n * q_dim];
            let qs = &q[pos0 * q_dim..];
            attention.attend(&cpu, cache.layer(0), qs, n, pos0, Some(6), &mut out);
            for t in 0..n {
                check(&out[t * q_dim..(t + 1) * q_dim], pos0 + t, 6);
            }
        }
    }
}
