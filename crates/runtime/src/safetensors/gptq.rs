//! GPTQ checkpoints (AutoGPTQ / GPTQModel layout), decoded exactly to codes + scales + offsets.
//!
//! Per linear layer `W` (`[N][K]`, N = output features):
//! - `qweight` int32 `[K·bits/32, N]`: column `n` holds the codes `q[k][n]` as one bit stream along
//!   K, LSB first (3-bit codes straddle words);
//! - `qzeros` int32 `[G, N·bits/32]`: row `g` holds the zero points along N the same way, stored
//!   minus one in the v1 format (`checkpoint_format: "gptq"`), as they are in `gptq_v2`;
//! - `scales` f16 `[G, N]`; `g_idx` int32 `[K]`: the group of each input feature.
//!
//! `w[n][k] = scale[g][n]·(q[k][n] − zero[g][n])` with `g = g_idx[k]`, so the code is `q`, the
//! scale `scale`, and the offset `−scale·zero`. When `g_idx` is not `k / group_size` (act-order,
//! `desc_act: true`), groups are not contiguous along K. Sorting the input features by group
//! (a stable permutation `perm`) makes them contiguous again, so such a layer is decoded exactly
//! as the ordinary grouped matrix `W[:, perm]` plus `perm`: `W·x = W[:, perm]·x[perm]`. Only when
//! the groups are not all `group_size` features, or K is not a multiple of 32 (the tables' block),
//! is it dequantized exactly to dense values instead (the loader then stores it as int8).

use crate::error::{Error, Result};
use crate::weights::DecodedTensor;

use super::{Dtype, TensorRef};

/// The `quantization_config` of a GPTQ `config.json`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GptqConfig {
    /// Bits per code: 2, 3 or 4.
    pub bits: u8,
    /// Input features per group; `None` for one group per row (`group_size: -1`).
    pub group_size: Option<usize>,
    /// Symmetric quantization: every zero point is `2^(bits−1)`.
    pub sym: bool,
    /// Act-order (`desc_act`): `g_idx` may be unsorted.
    pub desc_act: bool,
    /// `checkpoint_format: "gptq_v2"`: zeros stored as they are (v1 stores zero − 1).
    pub v2: bool,
}

impl GptqConfig {
    /// Reads `quantization_config` (`q`) of `config.json` at `path`.
    pub fn from_json(q: &serde_json::Value, path: &std::path::Path) -> Result<GptqConfig> {
        let err = |key: &str, reason: String| Error::Metadata {
            path: path.to_path_buf(),
            key: format!("quantization_config.{key}"),
            reason,
        };
        let bits = q
            .get("bits")
            .and_then(|b| b.as_u64())
            .ok_or_else(|| err("bits", "missing or not an integer".into()))?;
        if !(2..=4).contains(&bits) {
            return Err(err(
                "bits",
                format!("{bits}-bit GPTQ is not supported (2, 3 and 4 are)"),
            ));
        }
        let group_size = match q.get("group_size").and_then(|g| g.as_i64()) {
            None | Some(-1) => None,
            Some(g) if g > 0 => Some(g as usize),
            Some(g) => return Err(err("group_size", format!("{g} is not a group size"))),
        };
        let flag =
            |key: &str, default: bool| q.get(key).and_then(|v| v.as_bool()).unwrap_or(default);
        let v2 = match q.get("checkpoint_format").and_then(|f| f.as_str()) {
            None | Some("gptq") => false,
            Some("gptq_v2") => true,
            Some(other) => {
                return Err(err(
                    "checkpoint_format",
                    format!("'{other}' is not supported (gptq and gptq_v2 are)"),
                ))
            }
        };
        Ok(GptqConfig {
            bits: bits as u8,
            group_size,
            sym: flag("sym", true),
            desc_act: flag("desc_act", false),
            v2,
        })
    }
}

/// The tensors of one GPTQ linear layer.
#[derive(Clone, Copy, Debug)]
pub struct GptqTensors<'a> {
    /// `prefix.qweight`.
    pub qweight: TensorRef<'a>,
    /// `prefix.qzeros`.
    pub qzeros: TensorRef<'a>,
    /// `prefix.scales`.
    pub scales: TensorRef<'a>,
    /// `prefix.g_idx`, if stored.
    pub g_idx: Option<TensorRef<'a>>,
}

/// A decoded GPTQ layer.
#[derive(Clone, Debug, PartialEq)]
pub struct GptqDecoded {
    /// Low-bit codes + scales + offsets (columns in the order `perm`, when there is one), or
    /// dense values for act-order layers whose groups are uneven.
    pub tensor: DecodedTensor,
    /// Groups were not contiguous along K (act-order).
    pub act_order: bool,
    /// For act-order layers kept low-bit: column `i` of `tensor` is input feature `perm[i]`.
    pub perm: Option<Vec<u32>>,
}

/// 32-bit words of an I32 or U32 tensor.
fn words(t: &TensorRef) -> Result<Vec<u32>> {
    match t.dtype {
        Dtype::I32 | Dtype::U32 => Ok(t
            .data
            .chunks_exact(4)
            .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect()),
        _ => Err(Error::UnsupportedTensorType {
            path: t.path.to_path_buf(),
            tensor: t.name.to_string(),
            ty: format!("{:?} (GPTQ packs into int32)", t.dtype),
        }),
    }
}

/// Value `i` of a bit stream of `bits`-bit values spread over `words[0], words[stride], ...`.
fn unpack(words: &[u32], stride: usize, bits: u32, i: usize) -> u32 {
    let p = i * bits as usize;
    let (w, off) = (p / 32, (p % 32) as u32);
    let mut v = words[w * stride] >> off;
    if off + bits > 32 {
        v |= words[(w + 1) * stride] << (32 - off);
    }
    v & ((1 << bits) - 1)
}

/// Decodes one GPTQ layer of `rows` (N) output and `cols` (K) input features.
pub fn decode(cfg: &GptqConfig, t: &GptqTensors, rows: usize, cols: usize) -> Result<GptqDecoded> {
    let (n, k, bits) = (rows, cols, u32::from(cfg.bits));
    let gs = cfg.group_size.unwrap_or(k);
    if gs == 0 || !k.is_multiple_of(gs) {
        return Err(t.qweight.error(&format!(
            "group size {gs} does not divide the {k} input features"
        )));
    }
    if !(k * bits as usize).is_multiple_of(32) || !(n * bits as usize).is_multiple_of(32) {
        return Err(t.qweight.error(&format!(
            "a {n}x{k} matrix does not pack into whole int32 words at {bits} bits"
        )));
    }
    let groups = k / gs;
    let zero_words = n * bits as usize / 32;
    t.qweight.expect_shape(&[k * bits as usize / 32, n])?;
    t.qzeros.expect_shape(&[groups, zero_words])?;
    t.scales.expect_shape(&[groups, n])?;
    let qweight = words(&t.qweight)?;
    let qzeros = words(&t.qzeros)?;
    let scales = t.scales.to_f32()?;
    if let Some(bad) = scales.iter().position(|s| !s.is_finite()) {
        return Err(t
            .scales
            .error(&format!("scale {} is not finite", scales[bad])));
    }

    // Zero points, [groups][n], after the v1 correction.
    let mut zeros = vec![0i32; groups * n];
    for g in 0..groups {
        let row = &qzeros[g * zero_words..(g + 1) * zero_words];
        for c in 0..n {
            let stored = unpack(row, 1, bits, c) as i32;
            let zero = if cfg.v2 { stored } else { stored + 1 };
            if cfg.sym && zero != 1 << (bits - 1) {
                return Err(t.qzeros.error(&format!(
                    "symmetric {bits}-bit zero points must read {} after the {} correction, \
                     found {zero} (group {g}, column {c}); is checkpoint_format right?",
                    1 << (bits - 1),
                    if cfg.v2 { "gptq_v2 (no)" } else { "v1 (+1)" },
                )));
            }
            zeros[g * n + c] = zero;
        }
    }

    // Group of each input feature.
    let group_of: Vec<usize> = match &t.g_idx {
        None => (0..k).map(|i| i / gs).collect(),
        Some(g_idx) => {
            g_idx.expect_shape(&[k])?;
            g_idx
                .to_i32()?
                .iter()
                .enumerate()
                .map(|(i, &g)| {
                    usize::try_from(g)
                        .ok()
                        .filter(|&g| g < groups)
                        .ok_or_else(|| {
                            g_idx.error(&format!("g_idx[{i}] = {g} is outside the {groups} groups"))
                        })
                })
                .collect::<Result<_>>()?
        }
    };
    let act_order = group_of.iter().enumerate().any(|(i, &g)| g != i / gs);
    let code = |row: usize, col: usize| unpack(&qweight[row..], n, bits, col) as u8;

    // Input features sorted by group (stable); the identity without act-order.
    let mut perm: Vec<usize> = (0..k).collect();
    if act_order {
        perm.sort_by_key(|&c| group_of[c]);
    }
    // Sorted, group j must be exactly features j·gs..(j+1)·gs, in a group size the LUT kernels
    // take; otherwise the layer stays exact as dense values (then int8), as before act-order
    // layers had a low-bit path.
    let even = perm.iter().enumerate().all(|(i, &c)| group_of[c] == i / gs);
    let lut_group = matches!(gs, 32 | 64 | 128 | 256) || gs == k;
    if act_order && !(even && lut_group && k.is_multiple_of(32)) {
        let mut values = vec![0.0f32; n * k];
        for (r, out) in values.chunks_exact_mut(k).enumerate() {
            for (c, v) in out.iter_mut().enumerate() {
                let g = group_of[c] * n + r;
                *v = scales[g] * (f32::from(code(r, c)) - zeros[g] as f32);
            }
        }
        return Ok(GptqDecoded {
            tensor: DecodedTensor::Dense {
                rows: n,
                cols: k,
                values,
            },
            act_order: true,
            perm: None,
        });
    }
    let mut codes = vec![0u8; n * k];
    for (r, out) in codes.chunks_exact_mut(k).enumerate() {
        for (q, &c) in out.iter_mut().zip(&perm) {
            *q = code(r, c);
        }
    }
    let mut row_scales = vec![0.0f32; n * groups];
    let mut offsets = vec![0.0f32; n * groups];
    for r in 0..n {
        for g in 0..groups {
            let s = scales[g * n + r];
            row_scales[r * groups + g] = s;
            offsets[r * groups + g] = -s * zeros[g * n + r] as f32;
        }
    }
    Ok(GptqDecoded {
        tensor: DecodedTensor::LowBit {
            rows: n,
            cols: k,
            bits: cfg.bits,
            group_size: gs,
            codes,
            scales: row_scales,
            offsets,
        },
        act_order,
        perm: act_order.then(|| perm.iter().map(|&c| c as u32).collect()),
    })
}

/// Packs codes `q[k][n]` (`[K][N]`, `bits` each) along K into GPTQ `qweight` words
/// (`[K·bits/32][N]`): the inverse of [`decode`]'s unpacking, for tests.
#[cfg(test)]
pub(crate) fn pack_along_rows(q: &[u32], rows: usize, cols: usize, bits: u32) -> Vec<i32> {
    let mut out = vec![0u32; rows * bits as usize / 32 * cols];
    for r in 0..rows {
        for c in 0..cols {
            let p = r * bits as usize;
            let (w, off) = (p / 32, (p % 32) as u32);
            let v = q[r * cols + c];
            out[w * cols + c] |= v << off;
            if off + bits > 32 {
                out[(w + 1) * cols + c] |= v >> (32 - off);
            }
        }
    }
    out.into_iter().map(|w| w as i32).collect()
}

/// Packs values `z[g][n]` along N into GPTQ `qzeros` words (`[G][N·bits/32]`), for tests.
#[cfg(test)]
pub(crate) fn pack_along_cols(z: &[u32], rows: usize, cols: usize, bits: u32) -> Vec<i32> {
    // Packing a row along N is packing a one-column matrix along its rows.
    z.chunks_exact(cols)
        .take(rows)
        .flat_map(|row| pack_along_rows(row, cols, 1, bits))
        .collect()
}
