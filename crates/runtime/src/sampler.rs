//! Token sampling with llama.cpp's semantics and defaults.
//!
//! The chain is llama.cpp's default order, restricted to the stages lutra offers:
//! repetition penalty → top-k → top-p → min-p → temperature → draw. A temperature ≤ 0 means
//! greedy: the arg-max after the penalty. Buffers are kept between calls, so sampling allocates
//! only on the first token.

use std::collections::hash_map::RandomState;
use std::hash::{BuildHasher, Hasher};

/// Sampling settings; `Default` gives llama.cpp's defaults.
#[derive(Debug, Clone, PartialEq)]
pub struct SamplerConfig {
    /// Logits are divided by this before the draw; ≤ 0 means greedy (default 0.8).
    pub temperature: f32,
    /// Keep only the `top_k` most likely tokens; 0 disables (default 40).
    pub top_k: usize,
    /// Keep the smallest set of tokens whose probabilities sum to at least `top_p`; 1 disables
    /// (default 0.95).
    pub top_p: f32,
    /// Drop tokens whose probability is below `min_p` times the most likely one's; 0 disables
    /// (default 0.05).
    pub min_p: f32,
    /// Divide positive / multiply negative logits of recently seen tokens by this; 1 disables
    /// (default 1.0).
    pub repeat_penalty: f32,
    /// How many of the most recent tokens the repetition penalty looks at (default 64).
    pub repeat_last_n: usize,
    /// Seed of the random generator; `None` picks one at random.
    pub seed: Option<u64>,
}

impl Default for SamplerConfig {
    fn default() -> Self {
        SamplerConfig {
            temperature: 0.8,
            top_k: 40,
            top_p: 0.95,
            min_p: 0.05,
            repeat_penalty: 1.0,
            repeat_last_n: 64,
            seed: None,
        }
    }
}

impl SamplerConfig {
    /// Greedy decoding (temperature 0), the other settings at their defaults.
    pub fn greedy() -> Self {
        SamplerConfig {
            temperature: 0.0,
            ..SamplerConfig::default()
        }
    }
}

/// Picks the next token from a row of logits.
#[derive(Debug, Clone)]
pub struct Sampler {
    config: SamplerConfig,
    rng: Xoshiro256,
    /// Candidate token ids, best first after selection; reused between calls.
    candidates: Vec<u32>,
    /// Probabilities of the surviving candidates; reused between calls.
    probs: Vec<f32>,
    /// `seen[id] == stamp` marks a token already penalised in this call.
    seen: Vec<u32>,
    stamp: u32,
}

impl Sampler {
    /// A sampler with the given settings, seeded from `config.seed` or from OS randomness.
    pub fn new(config: SamplerConfig) -> Self {
        let seed = config.seed.unwrap_or_else(random_seed);
        Sampler {
            config,
            rng: Xoshiro256::new(seed),
            candidates: Vec::new(),
            probs: Vec::new(),
            seen: Vec::new(),
            stamp: 0,
        }
    }

    /// The settings this sampler was made with.
    pub fn config(&self) -> &SamplerConfig {
        &self.config
    }

    /// Chooses the next token. `logits` is one row (`[vocab]`) and is modified in place by the
    /// penalty; `history` holds the tokens so far (prompt and generated), most recent last.
    ///
    /// An empty row returns token 0.
    pub fn sample(&mut self, logits: &mut [f32], history: &[u32]) -> u32 {
        if logits.is_empty() {
            return 0;
        }
        self.apply_repeat_penalty(logits, history);
        if self.config.temperature <= 0.0 {
            return argmax(logits);
        }
        self.select_top_k(logits);
        self.apply_top_p(logits);
        self.apply_min_p(logits);
        self.draw(logits)
    }

    /// Penalises each distinct token of the last `repeat_last_n` once, as llama.cpp does.
    fn apply_repeat_penalty(&mut self, logits: &mut [f32], history: &[u32]) {
        let penalty = self.config.repeat_penalty;
        if penalty == 1.0 || self.config.repeat_last_n == 0 || history.is_empty() {
            return;
        }
        if self.seen.len() < logits.len() {
            self.seen.resize(logits.len(), 0);
        }
        self.stamp = self.stamp.wrapping_add(1);
        if self.stamp == 0 {
            // The stamp wrapped: old marks could collide with the new stamp.
            self.seen.fill(0);
            self.stamp = 1;
        }
        let start = history.len().saturating_sub(self.config.repeat_last_n);
        for &id in &history[start..] {
            let i = id as usize;
            if i >= logits.len() || self.seen[i] == self.stamp {
                continue;
            }
            self.seen[i] = self.stamp;
            let l = &mut logits[i];
            if *l <= 0.0 {
                *l *= penalty;
            } else {
                *l /= penalty;
            }
        }
    }

    /// Fills `candidates` with the top-k ids sorted by descending logit (all ids if top-k is off).
    fn select_top_k(&mut self, logits: &[f32]) {
        let n = logits.len();
        // Descending logit, ties broken by id so the order is deterministic.
        let order = |a: &u32, b: &u32| {
            logits[*b as usize]
                .total_cmp(&logits[*a as usize])
                .then(a.cmp(b))
        };
        let k = self.config.top_k;
        if k == 0 || k >= n {
            self.candidates.clear();
            self.candidates.extend(0..n as u32);
            self.candidates.sort_unstable_by(order);
            return;
        }
        // One pass with a sorted buffer of the k best so far: almost every logit loses to the
        // current k-th best at the first comparison, so this costs ~n compares, not a sort.
        self.candidates.clear();
        self.candidates.extend(0..k as u32);
        self.candidates.sort_unstable_by(order);
        let mut threshold = logits[self.candidates[k - 1] as usize];
        for (i, &l) in logits.iter().enumerate().skip(k) {
            // Strictly greater: on a tie the earlier (lower) id already in the buffer wins.
            if l > threshold {
                let at = self
                    .candidates
                    .partition_point(|&c| logits[c as usize] >= l);
                self.candidates.pop();
                self.candidates.insert(at, i as u32);
                threshold = logits[self.candidates[k - 1] as usize];
            }
        }
    }

    /// Softmax of the candidates' logits (scaled by `1/temperature`) into `probs`.
    fn softmax(&mut self, logits: &[f32], temperature: f32) {
        let max = logits[self.candidates[0] as usize];
        self.probs.clear();
        let mut sum = 0.0f64;
        for &id in &self.candidates {
            let p = ((logits[id as usize] - max) / temperature).exp();
            sum += p as f64;
            self.probs.push(p);
        }
        let inv = (1.0 / sum) as f32;
        for p in &mut self.probs {
            *p *= inv;
        }
    }

    /// Keeps the shortest prefix of candidates whose probabilities reach `top_p` (at least one).
    fn apply_top_p(&mut self, logits: &[f32]) {
        let p = self.config.top_p;
        if p >= 1.0 {
            return;
        }
        self.softmax(logits, 1.0);
        let mut cum = 0.0f32;
        let mut keep = self.candidates.len();
        for (i, &q) in self.probs.iter().enumerate() {
            cum += q;
            if cum >= p {
                keep = i + 1;
                break;
            }
        }
        self.candidates.truncate(keep);
    }

    /// Drops candidates with probability below `min_p · p_max`, i.e. logit below
    /// `max + ln(min_p)` (at least one survives).
    fn apply_min_p(&mut self, logits: &[f32]) {
        let p = self.config.min_p;
        if p <= 0.0 {
            return;
        }
        let threshold = logits[self.candidates[0] as usize] + p.ln();
        let keep = self
            .candidates
            .iter()
            .position(|&id| logits[id as usize] < threshold)
            .unwrap_or(self.candidates.len())
            .max(1);
        self.candidates.truncate(keep);
    }

    /// Applies the temperature and draws one candidate by its probability.
    fn draw(&mut self, logits: &[f32]) -> u32 {
        self.softmax(logits, self.config.temperature);
        let r = self.rng.next_f32();
        let mut cum = 0.0f32;
        for (i, &q) in self.probs.iter().enumerate() {
            cum += q;
            if r < cum {
                return self.candidates[i];
            }
        }
        // Rounding left `cum` a hair under 1 and `r` above it: the last candidate.
        self.candidates[self.candidates.len() - 1]
    }
}

/// Index of the largest logit (the first one on ties).
pub fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &l) in logits.iter().enumerate() {
        if l > logits[best] {
            best = i;
        }
    }
    best as u32
}

/// A seed from the OS-randomised hasher keys, mixed with the clock.
fn random_seed() -> u64 {
    let mut h = RandomState::new().build_hasher();
    if let Ok(t) = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH) {
        h.write_u128(t.as_nanos());
    }
    h.finish()
}

/// xoshiro256** (Blackman & Vigna), seeded through splitmix64: small, fast, reproducible.
#[derive(Debug, Clone)]
struct Xoshiro256 {
    s: [u64; 4],
}

impl Xoshiro256 {
    fn new(seed: u64) -> Self {
        let mut sm = seed;
        let mut next = || {
            sm = sm.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let mut z = sm;
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            z ^ (z >> 31)
        };
        Xoshiro256 {
            s: [next(), next(), next(), next()],
        }
    }

    fn next_u64(&mut self) -> u64 {
        let s = &mut self.s;
        let result = s[1].wrapping_mul(5).rotate_left(7).wrapping_mul(9);
        let t = s[1] << 17;
        s[2] ^= s[0];
        s[3] ^= s[1];
        s[1] ^= s[2];
        s[0] ^= s[3];
        s[2] ^= t;
        s[3] = s[3].rotate_left(45);
        result
    }

    /// Uniform in [0, 1), from the top 24 bits.
    fn next_f32(&mut self) -> f32 {
        (self.next_u64() >> 40) as f32 * (1.0 / (1u64 << 24) as f32)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plain(temperature: f32, seed: u64) -> SamplerConfig {
        SamplerConfig {
            temperature,
            top_k: 0,
            top_p: 1.0,
            min_p: 0.0,
            repeat_penalty: 1.0,
            repeat_last_n: 64,
            seed: Some(seed),
        }
    }

    fn softmax(logits: &[f32]) -> Vec<f64> {
        let max = logits.iter().cloned().fold(f32::MIN, f32::max);
        let e: Vec<f64> = logits.iter().map(|&l| ((l - max) as f64).exp()).collect();
        let s: f64 = e.iter().sum();
        e.iter().map(|x| x / s).collect()
    }

    /// Which tokens can ever be drawn, over many draws with different seeds.
    fn support(cfg: &SamplerConfig, logits: &[f32], history: &[u32]) -> Vec<u32> {
        let mut seen = vec![false; logits.len()];
        for seed in 0..2000 {
            let mut s = Sampler::new(SamplerConfig {
                seed: Some(seed),
                ..cfg.clone()
            });
            let mut l = logits.to_vec();
            seen[s.sample(&mut l, history) as usize] = true;
        }
        (0..logits.len() as u32)
            .filter(|&i| seen[i as usize])
            .collect()
    }

    #[test]
    fn greedy_is_argmax() {
        let logits = [0.1, 3.0, -1.0, 2.9, 0.0];
        let mut s = Sampler::new(SamplerConfig::greedy());
        for _ in 0..10 {
            assert_eq!(s.sample(&mut logits.clone(), &[]), 1);
        }
        assert_eq!(argmax(&[1.0, 5.0, 5.0]), 1);
    }

    #[test]
    fn empirical_distribution_matches_softmax() {
        let logits = [1.0f32, 0.5, -0.3, 2.0, 0.0, -1.5, 1.2, 0.7];
        let expected = softmax(&logits);
        let mut s = Sampler::new(plain(1.0, 42));
        let n = 20_000;
        let mut counts = [0usize; 8];
        for _ in 0..n {
            counts[s.sample(&mut logits.clone(), &[]) as usize] += 1;
        }
        // Pearson chi-square with 7 degrees of freedom: the 99.9% quantile is 24.3.
        let chi2: f64 = counts
            .iter()
            .zip(&expected)
            .map(|(&c, &p)| {
                let e = p * n as f64;
                (c as f64 - e).powi(2) / e
            })
            .sum();
        assert!(chi2 < 24.3, "chi2 = {chi2}, counts {counts:?}");
    }

    #[test]
    fn temperature_sharpens() {
        let logits = [1.0f32, 0.0];
        let count_first = |t: f32| {
            let mut s = Sampler::new(plain(t, 7));
            (0..5000)
                .filter(|_| s.sample(&mut logits.clone(), &[]) == 0)
                .count()
        };
        // p(first) is 0.73 at t = 1 and 0.88 at t = 0.5.
        let cold = count_first(0.5);
        let warm = count_first(1.0);
        assert!(cold > warm + 400, "cold {cold} warm {warm}");
    }

    #[test]
    fn top_k_one_is_greedy() {
        let logits: Vec<f32> = (0..100).map(|i| ((i * 37) % 101) as f32 * 0.05).collect();
        let best = argmax(&logits);
        let cfg = SamplerConfig {
            top_k: 1,
            ..plain(1.5, 0)
        };
        assert_eq!(support(&cfg, &logits, &[]), vec![best]);
    }

    #[test]
    fn top_k_keeps_the_k_best() {
        let logits = [0.0f32, 5.0, 1.0, 4.0, 2.0, 3.0];
        let cfg = SamplerConfig {
            top_k: 3,
            ..plain(100.0, 0)
        };
        assert_eq!(support(&cfg, &logits, &[]), vec![1, 3, 5]);
    }

    #[test]
    fn top_k_selection_matches_a_full_sort() {
        // Few distinct values, so ties are common: the order must still be (logit desc, id asc).
        let mut rng = Xoshiro256::new(11);
        let logits: Vec<f32> = (0..5000)
            .map(|_| (rng.next_u64() % 50) as f32 * 0.25)
            .collect();
        let mut expected: Vec<u32> = (0..logits.len() as u32).collect();
        expected.sort_by(|&a, &b| {
            logits[b as usize]
                .total_cmp(&logits[a as usize])
                .then(a.cmp(&b))
        });
        for k in [1, 7, 40, 4999, 5000, 0] {
            let mut s = Sampler::new(SamplerConfig {
                top_k: k,
                ..plain(1.0, 0)
            });
            s.select_top_k(&logits);
            let want = if k == 0 { 5000 } else { k };
            assert_eq!(s.candidates, expected[..want], "k = {k}");
        }
    }

    #[test]
    fn top_p_keeps_the_smallest_sufficient_set() {
        // Probabilities 0.5, 0.3, 0.15, 0.05 (logits are their logs).
        let logits = [0.5f32.ln(), 0.3f32.ln(), 0.15f32.ln(), 0.05f32.ln()];
        let with_p = |p: f32| {
            let cfg = SamplerConfig {
                top_p: p,
                ..plain(1.0, 0)
            };
            support(&cfg, &logits, &[])
        };
        assert_eq!(with_p(0.75), vec![0, 1]);
        assert_eq!(with_p(0.85), vec![0, 1, 2]);
        assert_eq!(with_p(0.4), vec![0]);
        assert_eq!(with_p(0.0), vec![0]);
    }

    #[test]
    fn min_p_drops_unlikely_tokens() {
        // Probabilities relative to the best: 1, 0.5, 0.2, 0.04.
        let logits = [0.0f32, 0.5f32.ln(), 0.2f32.ln(), 0.04f32.ln()];
        let with_min_p = |p: f32| {
            let cfg = SamplerConfig {
                min_p: p,
                ..plain(1.0, 0)
            };
            support(&cfg, &logits, &[])
        };
        assert_eq!(with_min_p(0.05), vec![0, 1, 2]);
        assert_eq!(with_min_p(0.3), vec![0, 1]);
        assert_eq!(with_min_p(0.9), vec![0]);
    }

    #[test]
    fn repeat_penalty_lowers_recent_tokens_only() {
        let mut s = Sampler::new(SamplerConfig {
            repeat_penalty: 2.0,
            repeat_last_n: 3,
            ..SamplerConfig::greedy()
        });
        let mut logits = [4.0f32, -1.0, 3.0, 2.0, 1.0];
        // Token 3 is outside the last 3; token 0 appears twice but is penalised once.
        let chosen = s.sample(&mut logits, &[3, 0, 1, 0]);
        assert_eq!(logits, [2.0, -2.0, 3.0, 2.0, 1.0]);
        assert_eq!(chosen, 2);
    }

    #[test]
    fn same_seed_same_sequence_different_seed_differs() {
        let logits: Vec<f32> = (0..50).map(|i| (i as f32 * 0.37).sin()).collect();
        let run = |seed: u64| {
            let mut s = Sampler::new(plain(1.0, seed));
            (0..64)
                .map(|_| s.sample(&mut logits.clone(), &[]))
                .collect::<Vec<_>>()
        };
        assert_eq!(run(1), run(1));
        assert_ne!(run(1), run(2));
    }

    #[test]
    fn defaults_are_llama_cpp_defaults() {
        let d = SamplerConfig::default();
        assert_eq!(
            (d.temperature, d.top_k, d.top_p, d.min_p),
            (0.8, 40, 0.95, 0.05)
        );
        assert_eq!((d.repeat_penalty, d.repeat_last_n, d.seed), (1.0, 64, None));
    }

    #[test]
    fn uniform_floats_are_in_range() {
        let mut r = Xoshiro256::new(3);
        let mut sum = 0.0f64;
        for _ in 0..10_000 {
            let x = r.next_f32();
            assert!((0.0..1.0).contains(&x));
            sum += x as f64;
        }
        assert!((sum / 10_000.0 - 0.5).abs() < 0.02);
    }
}
