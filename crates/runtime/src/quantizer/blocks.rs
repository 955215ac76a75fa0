//! Quantizing a loaded model block by block, GPTQ-style: the calibration sequences run through
//! the blocks already quantized, each block's matrix inputs give the Hessians its matrices are
//! quantized with, and the quantized block then carries the sequences on to the next one. Memory
//! stays near one block's f32 weights and Hessians beside the model itself, plus the source
//! model's inputs of one block over the calibration sequences.
//!
//! Within a block the inputs are measured in turn (q/k/v's, then o's with q/k/v quantized, then
//! gate/up's, then down's), and each matrix aims at the *source* model's outputs: the same
//! sequences also run through the source blocks, and the pairing of the two models' inputs
//! shifts each matrix's GPTQ target ([`PreparedHessian::source_shift`]) so that it makes up for
//! the error of everything quantized before it.

use std::collections::HashMap;
use std::ops::ControlFlow;
use std::time::{Duration, Instant};

use crate::error::{Error, Result};
use crate::linear::Linear;
use crate::llama::calibrate::{BlockMatrix, BlockRunner, MatrixInput};
use crate::llama::Model;

use super::calibration::{Calibration, Hessian};
use crate::quantize::ggml_types::GgmlTarget;
use crate::quantize::gptq::{
    gptq_prepared, rtn, GptqOptions, PreparedHessian, SourcePairs, SourceShift,
};
use crate::quantize::grid::UniformGrid;
use crate::quantize::hlq::PlaneGrid;
use crate::rotation::InputRotation;
use crate::weights::{decode_ggml, GgmlType};

/// Seed of the rotations of [`QuantizeOptions::rotate`] (each block input's is this mixed with
/// the block and the input).
const ROTATION_SEED: u64 = 0x6c75_7472_612d_726f;

/// How codes are chosen.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Method {
    /// Round to nearest on a min/max grid per group.
    Rtn,
    /// GPTQ: column by column, rounding error compensated through the inverse Hessian.
    Gptq,
    /// Round to nearest on a per-bit-plane grid fitted by least squares (HLQ).
    Hlq,
    /// GPTQ on HLQ grids, plane scales refitted after rounding.
    GptqHlq,
}

impl Method {
    /// Whether the method reads calibration Hessians.
    pub fn calibrated(self) -> bool {
        matches!(self, Method::Gptq | Method::GptqHlq)
    }

    /// The name used on the command line and in files.
    pub fn name(self) -> &'static str {
        match self {
            Method::Rtn => "rtn",
            Method::Gptq => "gptq",
            Method::Hlq => "hlq",
            Method::GptqHlq => "gptq+hlq",
        }
    }
}

impl std::str::FromStr for Method {
    type Err = Error;
    fn from_str(s: &str) -> Result<Method> {
        match s {
            "rtn" => Ok(Method::Rtn),
            "gptq" => Ok(Method::Gptq),
            "hlq" => Ok(Method::Hlq),
            "gptq+hlq" | "hlq+gptq" => Ok(Method::GptqHlq),
            _ => Err(Error::InvalidOption(format!(
                "quantization method {s:?}: use rtn, gptq, hlq or gptq+hlq"
            ))),
        }
    }
}

/// Bits per weight.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Bits {
    /// Every matrix this many bits (1..=4).
    Uniform(u8),
    /// Matrices of `floor(average)` and `floor(average) + 1` bits, the wider ones those whose
    /// calibrated error falls most per added bit, so that the average over all block weights is
    /// `average` (like the `_M` mixes of llama.cpp's K-quants, but measured).
    Mixed {
        /// Average bits per weight, in (1, 4).
        average: f32,
    },
}

impl Bits {
    /// The narrowest width used.
    pub fn base(self) -> u8 {
        match self {
            Bits::Uniform(b) => b,
            Bits::Mixed { average } => average.floor() as u8,
        }
    }
}

impl std::str::FromStr for Bits {
    type Err = Error;
    fn from_str(s: &str) -> Result<Bits> {
        let bad = || {
            Error::InvalidOption(format!(
                "bits {s:?}: use 1, 2, 3 or 4, or an average between them such as 2.5"
            ))
        };
        if let Ok(b) = s.parse::<u8>() {
            return if (1..=4).contains(&b) {
                Ok(Bits::Uniform(b))
            } else {
                Err(bad())
            };
        }
        let average: f32 = s.parse().map_err(|_| bad())?;
        if average > 1.0 && average < 4.0 && average.fract() != 0.0 {
            Ok(Bits::Mixed { average })
        } else {
            Err(bad())
        }
    }
}

impl std::fmt::Display for Bits {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Bits::Uniform(b) => write!(f, "{b}"),
            Bits::Mixed { average } => write!(f, "{average} (mixed)"),
        }
    }
}

/// What [`quantize_model`] does.
#[derive(Clone, Debug)]
pub struct QuantizeOptions {
    /// How codes are chosen.
    pub method: Method,
    /// Bits per weight of every matrix, or their average.
    pub bits: Bits,
    /// Weights per group along a row (32, 64, 128 or 256).
    pub group_size: usize,
    /// Calibration sequences (read by the calibrated methods only).
    pub calibration: Calibration,
    /// GPTQ's dampening, block and column order (its `threads` and `isa` are the model's).
    pub gptq: GptqOptions,
    /// What the block matrices become.
    pub target: Target,
    /// Which block inputs are rotated ([`crate::rotation`]): a random rotation per input, applied
    /// to the weights and the Hessians before quantizing and to the activations at run time.
    pub rotate: Rotate,
}

/// Which block inputs [`quantize_model`] rotates.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Rotate {
    /// The inputs whose matrices are all narrower than 4 bits, in lutra types (a rotation
    /// lowers the error of 2- and 3-bit grids, while at 4 bits a source that is itself 4-bit,
    /// such as a Q4_0 or Q4_1 file, is best kept on its own grid).
    Auto,
    /// Every input (lutra types only).
    Always,
    /// None.
    Never,
}

impl Rotate {
    /// Whether an input read by matrices of `widths` bits is rotated for `target`.
    fn applies(self, target: Target, widths: impl IntoIterator<Item = u8>) -> bool {
        match (self, target) {
            (Rotate::Never, _) | (_, Target::Ggml(_)) => false,
            (Rotate::Always, Target::Lut) => true,
            (Rotate::Auto, Target::Lut) => widths.into_iter().all(|b| b < 4),
        }
    }
}

impl std::str::FromStr for Rotate {
    type Err = Error;
    fn from_str(s: &str) -> Result<Rotate> {
        match s {
            "auto" => Ok(Rotate::Auto),
            "always" => Ok(Rotate::Always),
            "never" => Ok(Rotate::Never),
            _ => Err(Error::InvalidOption(format!(
                "rotation {s:?}: use auto, always or never"
            ))),
        }
    }
}

/// The form of the quantized block matrices.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Target {
    /// lutra's LUT forms: uniform or HLQ grids (by the method), of [`QuantizeOptions::bits`]
    /// and [`QuantizeOptions::group_size`].
    Lut,
    /// A standard ggml block type that llama.cpp reads, its codes chosen by the method (round
    /// to nearest or GPTQ); bits and group size are the type's.
    Ggml(GgmlTarget),
}

/// Where [`quantize_model`] is.
#[derive(Clone, Copy, Debug)]
pub struct Progress {
    /// Blocks done.
    pub done: usize,
    /// Blocks in all.
    pub blocks: usize,
    /// Time since the start.
    pub elapsed: Duration,
}

/// One quantized matrix, as [`quantize_model`] hands it on.
pub struct QuantizedMatrix<'a> {
    /// GGUF tensor name.
    pub name: String,
    /// Bits per weight of this matrix.
    pub bits: u8,
    /// The matrix packed for the kernels (now part of the model).
    pub linear: &'a Linear,
    /// For a ggml target: the type and the matrix's bytes in it.
    pub ggml: Option<(GgmlType, &'a [u8])>,
    /// The matrix is stored for its input rotated ([`QuantizeOptions::rotate`]).
    pub rotated: bool,
}

/// Quantizes every block matrix of `model` in place (embeddings, norms and the LM head keep
/// their form), handing each to `on_matrix` as it is made and reporting `progress` after each
/// block.
pub fn quantize_model(
    model: &mut Model,
    opts: &QuantizeOptions,
    on_matrix: &mut dyn FnMut(QuantizedMatrix<'_>) -> Result<()>,
    progress: &mut dyn FnMut(Progress),
) -> Result<()> {
    if opts.rotate == Rotate::Always && opts.target != Target::Lut {
        return Err(Error::InvalidOption(
            "rotated inputs are lutra's own: a ggml type is written unrotated".into(),
        ));
    }
    if opts.target == Target::Lut && !matches!(opts.group_size, 32 | 64 | 128 | 256) {
        return Err(Error::InvalidOption(format!(
            "group size {}: use 32, 64, 128 or 256",
            opts.group_size
        )));
    }
    // GPTQ's vector sums run on the model's instruction set.
    let opts = &QuantizeOptions {
        gptq: GptqOptions {
            isa: model.isa(),
            ..opts.gptq
        },
        ..opts.clone()
    };
    let start = Instant::now();
    let blocks = model.block_count();
    let threads = model.threads();
    let needs_calibration = opts.method.calibrated() || matches!(opts.bits, Bits::Mixed { .. });
    // Residual rows of every calibration sequence entering the next block.
    let mut residuals = if needs_calibration {
        calibration_residuals(model, &opts.calibration)?
    } else {
        Vec::new()
    };
    let widths = match opts.bits {
        Bits::Uniform(b) => vec![[b; 7]; blocks],
        Bits::Mixed { average } => plan_widths(model, residuals.clone(), average, opts)?,
    };
    let positions = opts.calibration.tokens;
    // The same sequences through the source model's blocks: the outputs the quantized matrices
    // aim at.
    let mut sources = if opts.method.calibrated() {
        residuals.clone()
    } else {
        Vec::new()
    };
    // Scratch for running blocks: a run state is sized for the matrices it was made for, so
    // this is made again only after a matrix is replaced.
    let mut runner: Option<BlockRunner> = None;
    for (layer, widths) in widths.iter().enumerate() {
        let mut source_inputs = if opts.method.calibrated() {
            let runner = runner.get_or_insert_with(|| model.block_runner(positions));
            source_inputs(model, runner, layer, &mut sources)?
        } else {
            HashMap::new()
        };
        let mut partials: Vec<PartialRun> = residuals
            .drain(..)
            .map(|residual| PartialRun {
                input: MatrixInput::Attention,
                rows: Vec::new(),
                residual,
            })
            .collect();
        // The current input's Hessian and source shift, measured when its first matrix comes, so
        // after the block's earlier matrices are quantized (q/k/v, then o, then gate/up, then
        // down).
        let mut calibrated: Option<(MatrixInput, PreparedHessian, SourceShift)> = None;
        // Each input's rotation, drawn when its first matrix comes.
        let mut rotations: HashMap<MatrixInput, Option<InputRotation>> = HashMap::new();
        for (which, &bits) in BlockMatrix::ALL.into_iter().zip(widths) {
            let name = which.gguf_name(layer);
            let named = |e: Error| Error::InvalidOption(format!("{name}: {e}"));
            let input = which.input();
            let k = model.input_width(layer, input);
            let rotation = rotations
                .entry(input)
                .or_insert_with(|| {
                    let readers = BlockMatrix::ALL.into_iter().zip(widths.iter().copied());
                    let read_by = readers.filter(|(m, _)| m.input() == input).map(|(_, b)| b);
                    let seed = ROTATION_SEED ^ ((layer as u64) << 8 | input.index() as u64);
                    opts.rotate
                        .applies(opts.target, read_by)
                        .then(|| InputRotation::random(k, seed))
                        .flatten()
                })
                .clone();
            if opts.method.calibrated() && calibrated.as_ref().is_none_or(|c| c.0 != input) {
                restore_rows(calibrated.take(), &mut partials)?;
                let (h, pairs) = input_hessian(
                    model,
                    runner.get_or_insert_with(|| model.block_runner(positions)),
                    layer,
                    input,
                    rotation.as_ref(),
                    &mut partials,
                    // Each input's source rows serve its Hessian alone.
                    &source_inputs.remove(&input).ok_or_else(|| {
                        Error::InvalidOption(format!("block {layer}: no source rows of {input:?}"))
                    })?,
                )?;
                // A rotation evens out the Hessian diagonal, so act-order has little to sort and
                // its static groups (fitted before GPTQ's updates) cost more than they gain.
                let gptq = GptqOptions {
                    act_order: opts.gptq.act_order && rotation.is_none(),
                    ..opts.gptq
                };
                let prepared = PreparedHessian::new(h, k, &gptq).map_err(named)?;
                let shift = prepared
                    .source_shift(pairs, model.input_rows(layer, input))
                    .map_err(named)?;
                // The inputs come in turn, each once: the earlier one's matrices are done.
                calibrated = Some((input, prepared, shift));
            }
            let matrix = model.block_matrix(layer, which);
            let (rows, cols) = (matrix.rows(), matrix.cols());
            let mut weights = matrix_values(matrix)?;
            if let Some(r) = &rotation {
                r.rotate_rows(&mut weights, &mut vec![0.0; cols])?;
            }
            let hessian = calibrated.as_ref().map(|(_, h, _)| h);
            if let Some((_, _, shift)) = &calibrated {
                weights = shift.target(&weights, model.cpu()).map_err(named)?;
            }
            let quantized = match opts.target {
                Target::Lut => quantize_matrix(&weights, rows, cols, hessian, bits, opts, threads)
                    .map(|linear| (linear, None)),
                Target::Ggml(t) => quantize_ggml(t, &weights, rows, cols, hessian, opts, threads)
                    .map(|(linear, bytes)| (linear, Some((t, bytes)))),
            };
            let (linear, ggml) = quantized.map_err(named)?;
            drop(weights);
            model.replace_block_matrix(layer, which, linear)?;
            let rotated = rotation.is_some();
            if let Some(r) = rotation {
                model.set_input_rotation(layer, input, r)?;
            }
            runner = None;
            on_matrix(QuantizedMatrix {
                name,
                bits,
                linear: model.block_matrix(layer, which),
                ggml: ggml.as_ref().map(|(t, b)| (t.ggml_type(), b.as_slice())),
                rotated,
            })?;
        }
        restore_rows(calibrated.take(), &mut partials)?;
        if !partials.is_empty() {
            let runner = runner.get_or_insert_with(|| model.block_runner(positions));
            for p in &mut partials {
                model.run_block_from(runner, layer, p.input, &p.rows, &mut p.residual, None)?;
            }
        }
        residuals = partials.into_iter().map(|p| p.residual).collect();
        progress(Progress {
            done: layer + 1,
            blocks,
            elapsed: start.elapsed(),
        });
    }
    Ok(())
}

/// The embedded calibration sequences: the rows entering the first block.
fn calibration_residuals(model: &Model, calibration: &Calibration) -> Result<Vec<Vec<f32>>> {
    let tokenizer = model.tokenizer().ok_or_else(|| {
        Error::InvalidOption("calibration needs the model's tokenizer, and it has none".into())
    })?;
    calibration
        .token_sequences(tokenizer)?
        .iter()
        .map(|seq| model.embed_tokens(seq))
        .collect()
}

/// Every matrix input's rows of block `layer`, the sequences' in turn (in the order of
/// `sources`), as the block runs over `sources` (which it carries on to the block's outputs). Each
/// input's rows are one allocation, which is given back to the system when it is freed.
fn source_inputs(
    model: &Model,
    runner: &mut BlockRunner,
    layer: usize,
    sources: &mut [Vec<f32>],
) -> Result<HashMap<MatrixInput, Vec<f32>>> {
    let hidden = model.config().hidden_size;
    let tokens = sources.iter().map(Vec::len).sum::<usize>() / hidden;
    let mut inputs: HashMap<MatrixInput, Vec<f32>> = BlockMatrix::ALL
        .into_iter()
        .map(|m| {
            let input = m.input();
            (
                input,
                Vec::with_capacity(tokens * model.input_width(layer, input)),
            )
        })
        .collect();
    for x in sources.iter_mut() {
        let mut observe = |input: MatrixInput, r: &[f32]| {
            if let Some(rows) = inputs.get_mut(&input) {
                rows.extend_from_slice(r);
            }
            ControlFlow::Continue(())
        };
        model.run_block(runner, layer, x, Some(&mut observe))?;
    }
    Ok(inputs)
}

/// Where the quantized block's run over one calibration sequence stands: the rows of matrix
/// input `input` and the residual where the run broke there. The next input's rows take only
/// the matrices between the two.
struct PartialRun {
    input: MatrixInput,
    rows: Vec<f32>,
    residual: Vec<f32>,
}

/// Gives the sequences back the rows of their current input that `calibrated`'s shift held
/// ([`SourcePairs::Rows`]) once its matrices are done.
fn restore_rows(
    calibrated: Option<(MatrixInput, PreparedHessian, SourceShift)>,
    partials: &mut [PartialRun],
) -> Result<()> {
    let Some(rows) = calibrated.and_then(|(_, _, shift)| shift.into_input_rows()) else {
        return Ok(());
    };
    if rows.len() != partials.len() {
        return Err(Error::InvalidOption(format!(
            "{} sequences of rows for {} calibration sequences",
            rows.len(),
            partials.len()
        )));
    }
    for (p, rows) in partials.iter_mut().zip(rows) {
        p.rows = rows;
    }
    Ok(())
}

/// The Hessian `Σ x·xᵀ` of matrix input `input` of block `layer` as the block runs on from
/// `partials` (each carried on to `input`), and how its rows `x` pair with the source model's
/// rows `s` of the same input (`sources`, the sequences' in turn): the cross sums
/// `Σ (s − x)·xᵀ`, or the rows themselves where [`SourcePairs::as_rows`] finds that cheaper (the
/// sequences' rows `x` then move into the pairs; [`restore_rows`] gives them back). With a
/// `rotation` the Hessian and the pairs are those of the rotated input (the rows `x` kept
/// unrotated, with the rotation).
fn input_hessian(
    model: &Model,
    runner: &mut BlockRunner,
    layer: usize,
    input: MatrixInput,
    rotation: Option<&InputRotation>,
    partials: &mut [PartialRun],
    sources: &[f32],
) -> Result<(Vec<f64>, SourcePairs)> {
    let threads = model.threads();
    let k = model.input_width(layer, input);
    let n = sources.len() / k;
    let as_rows = SourcePairs::as_rows(k, model.input_rows(layer, input), n);
    let mut hessian = Hessian::new(k, threads);
    let mut cross = (!as_rows).then(|| Hessian::new(k, threads));
    let mut diff_rows = Vec::with_capacity(if as_rows { sources.len() } else { 0 });
    let (mut x, mut diff, mut buffer) = (Vec::new(), Vec::new(), Vec::new());
    let hidden = model.config().hidden_size;
    let tokens = partials.iter().map(|p| p.residual.len()).sum::<usize>() / hidden;
    if tokens * k != sources.len() {
        return Err(Error::InvalidOption(format!(
            "block {layer}: {} values of the source model's {input:?} rows for {tokens} \
             calibration tokens of {k}",
            sources.len()
        )));
    }
    // A run resumed at the attention input recomputes its rows from the residual, but the pairs'
    // rows keep them.
    let keep = input != MatrixInput::Attention || as_rows;
    let mut first = 0;
    for p in partials.iter_mut() {
        let len = p.residual.len() / hidden * k;
        let source = &sources[first..first + len];
        first += len;
        let mut seen = 0;
        let mut failure = None;
        let mut rows_at = Vec::with_capacity(if keep { len } else { 0 });
        // The block stops at `input`: the matrices after it do not change its rows.
        let mut observe = |at: MatrixInput, rows: &[f32]| {
            if failure.is_some() {
                return ControlFlow::Break(());
            }
            if at != input {
                return ControlFlow::Continue(());
            }
            if keep {
                rows_at.extend_from_slice(rows);
            }
            let Some(source) = source.get(seen..seen + rows.len()) else {
                failure = Some(None);
                return ControlFlow::Break(());
            };
            seen += rows.len();
            x.clear();
            x.extend_from_slice(rows);
            diff.clear();
            diff.extend(source.iter().zip(rows).map(|(s, x)| s - x));
            if let Some(r) = rotation {
                buffer.resize(rows.len(), 0.0);
                let rotated = r
                    .rotate_activations(model.cpu(), &mut x, &mut buffer)
                    .and_then(|()| r.rotate_activations(model.cpu(), &mut diff, &mut buffer));
                if let Err(e) = rotated {
                    failure = Some(Some(e));
                    return ControlFlow::Break(());
                }
            }
            hessian.add(&x);
            match &mut cross {
                Some(cross) => cross.add_pairs(&diff, &x),
                None => diff_rows.extend_from_slice(&diff),
            }
            ControlFlow::Break(())
        };
        model.run_block_from(
            runner,
            layer,
            p.input,
            &p.rows,
            &mut p.residual,
            Some(&mut observe),
        )?;
        if let Some(Some(e)) = failure {
            return Err(e);
        }
        if failure.is_some() || seen != source.len() {
            return Err(Error::InvalidOption(format!(
                "block {layer}: the source model's {input:?} rows do not pair with the quantized \
                 model's"
            )));
        }
        p.input = input;
        p.rows = rows_at;
    }
    let pairs = match cross {
        Some(cross) => SourcePairs::Sums(cross.finish().0),
        None => SourcePairs::Rows {
            diff: diff_rows,
            inputs: partials
                .iter_mut()
                .map(|p| std::mem::take(&mut p.rows))
                .collect(),
            rotation: rotation.cloned(),
        },
    };
    Ok((hessian.finish().0, pairs))
}

/// The diagonal of the Hessian `Σ x·xᵀ` of each matrix input of block `layer` over the
/// calibration residuals, which the block carries on to its outputs.
fn block_hessian_diagonals(
    model: &Model,
    runner: &mut BlockRunner,
    layer: usize,
    residuals: &mut [Vec<f32>],
) -> Result<HashMap<MatrixInput, Vec<f64>>> {
    let mut diag: HashMap<MatrixInput, Vec<f64>> = HashMap::new();
    for residual in residuals {
        let mut observe = |input: MatrixInput, rows: &[f32]| {
            let k = model.input_width(layer, input);
            let d = diag.entry(input).or_insert_with(|| vec![0.0; k]);
            for row in rows.chunks_exact(k) {
                for (d, &v) in d.iter_mut().zip(row) {
                    *d += f64::from(v) * f64::from(v);
                }
            }
            ControlFlow::Continue(())
        };
        model.run_block(runner, layer, residual, Some(&mut observe))?;
    }
    Ok(diag)
}

/// The f32 values `[rows][cols]` of a matrix.
fn matrix_values(m: &Linear) -> Result<Vec<f32>> {
    let cols = m.cols();
    let mut values = vec![0.0f32; m.rows() * cols];
    for (r, row) in values.chunks_exact_mut(cols).enumerate() {
        m.row(r, row)?;
    }
    Ok(values)
}

/// Bit widths per block matrix for an `average`: every matrix starts at `floor(average)` bits;
/// then, in order of the drop in calibrated error per added weight bit (round to nearest,
/// errors weighted by the input's mean square, measured on the unquantized model), matrices
/// get one bit more while the average stays within `average`.
fn plan_widths(
    model: &Model,
    mut residuals: Vec<Vec<f32>>,
    average: f32,
    opts: &QuantizeOptions,
) -> Result<Vec<[u8; 7]>> {
    let base = average.floor() as u8;
    let positions = opts.calibration.tokens;
    let blocks = model.block_count();
    // (gain per weight, layer, matrix index, weights)
    let mut gains: Vec<(f64, usize, usize, usize)> = Vec::new();
    let mut total_weights = 0usize;
    // The model's matrices stay as they are here, so one run state serves every block.
    let mut runner = model.block_runner(positions);
    for layer in 0..blocks {
        let diag = block_hessian_diagonals(model, &mut runner, layer, &mut residuals)?;
        for (i, which) in BlockMatrix::ALL.into_iter().enumerate() {
            let m = model.block_matrix(layer, which);
            let (rows, cols) = (m.rows(), m.cols());
            let weights = matrix_values(m)?;
            let importance = &diag[&which.input()];
            let error = |bits: u8| -> Result<f64> {
                let q = crate::quantize::quantize_rtn(rows, cols, &weights, bits, opts.group_size)?;
                Ok(q.dequantize()
                    .chunks_exact(cols)
                    .zip(weights.chunks_exact(cols))
                    .map(|(q, w)| {
                        q.iter()
                            .zip(w)
                            .zip(importance)
                            .map(|((q, w), h)| f64::from(q - w).powi(2) * h)
                            .sum::<f64>()
                    })
                    .sum())
            };
            let gain = (error(base)? - error(base + 1)?) / (rows * cols) as f64;
            gains.push((gain, layer, i, rows * cols));
            total_weights += rows * cols;
        }
    }
    gains.sort_by(|a, b| b.0.total_cmp(&a.0));
    let budget = ((average - f32::from(base)) as f64 * total_weights as f64) as usize;
    let mut widths = vec![[base; 7]; blocks];
    let mut spent = 0usize;
    for (_, layer, i, n) in gains {
        if spent + n <= budget {
            widths[layer][i] = base + 1;
            spent += n;
        }
    }
    Ok(widths)
}

/// One matrix `[rows][cols]` quantized to `bits` as `opts` says (with its input's prepared
/// Hessian when the method is calibrated), packed for the kernels.
fn quantize_matrix(
    weights: &[f32],
    rows: usize,
    cols: usize,
    hessian: Option<&PreparedHessian>,
    bits: u8,
    opts: &QuantizeOptions,
    threads: usize,
) -> Result<Linear> {
    let group_size = opts.group_size;
    let gptq_opts = GptqOptions {
        threads,
        ..opts.gptq
    };
    let importance = hessian.map(|h| h.importance());
    match opts.method {
        Method::Rtn | Method::Gptq => {
            let grid = UniformGrid { bits, group_size };
            let q = match hessian {
                Some(h) => gptq_prepared(&grid, rows, cols, weights, h, &gptq_opts)?,
                None => rtn(&grid, rows, cols, weights, importance)?,
            };
            Linear::from_decoded(&q.into_decoded(&grid, cols)?, false)
        }
        Method::Hlq | Method::GptqHlq => {
            let grid = PlaneGrid { bits, group_size };
            let q = match hessian {
                Some(h) => gptq_prepared(&grid, rows, cols, weights, h, &gptq_opts)?,
                None => rtn(&grid, rows, cols, weights, importance)?,
            };
            Linear::from_decoded(&q.into_decoded(&grid, cols)?, false)
        }
    }
}

/// One matrix in ggml type `target`, codes by round to nearest or GPTQ: the matrix for the
/// kernels (decoded from the bytes, exactly what llama.cpp reads) and the bytes.
fn quantize_ggml(
    target: GgmlTarget,
    weights: &[f32],
    rows: usize,
    cols: usize,
    hessian: Option<&PreparedHessian>,
    opts: &QuantizeOptions,
    threads: usize,
) -> Result<(Linear, Vec<u8>)> {
    if matches!(opts.method, Method::Hlq | Method::GptqHlq) {
        return Err(Error::InvalidOption(
            "HLQ grids are lutra's own: a ggml type takes --method rtn or gptq".into(),
        ));
    }
    let n = target.block_len();
    if !cols.is_multiple_of(n) {
        return Err(Error::InvalidOption(format!(
            "rows of {cols} are not whole {target:?} blocks of {n} (llama.cpp would fall back to \
             another type here; choose one whose block divides {cols}, e.g. Q4_0, Q5_0 or Q8_0)"
        )));
    }
    let gptq_opts = GptqOptions {
        threads,
        ..opts.gptq
    };
    let q = match hessian {
        Some(h) => gptq_prepared(&target, rows, cols, weights, h, &gptq_opts)?,
        None => rtn(&target, rows, cols, weights, None)?,
    };
    let per_row = cols / n;
    let mut bytes = Vec::with_capacity(rows * target.row_bytes(cols)?);
    for (blocks, codes) in q
        .blocks
        .chunks_exact(per_row)
        .zip(q.codes.chunks_exact(cols))
    {
        bytes.extend_from_slice(&target.encode_row(blocks, codes)?);
    }
    let decoded = decode_ggml(target.ggml_type(), rows, cols, &bytes)
        .map_err(|e| Error::InvalidOption(format!("{target:?} bytes do not decode: {e:?}")))?;
    Ok((Linear::from_decoded(&decoded, false)?, bytes))
}
