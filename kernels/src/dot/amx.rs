//! The dot GEMM's multiply on Intel AMX tiles, where the CPU has them and the operating system
//! lets this process use them.
//!
//! Each chunk's unpacked codes are first centred into signed bytes, `factor·q − top` (the odd
//! values `2q − (2^b − 1)` of codes up to 6 bits, or `q − 128` of wide codes), so that one
//! `tdpbssd` of 16 tokens' activation codes of a block by 16 rows' centred codes gives the blocks'
//! integer dots `D` of the module above directly, a 16 × 16 int32 tile. The centred codes keep
//! the unpacked layout, which is the one `tdpbssd` reads (four columns of a row per 32-bit lane,
//! the rows of a column quad together), and a block's activation codes lie an activation row
//! apart, so both operands load from where they are. The int32 tiles are stored and finished on
//! 512-bit vectors with the operations of the `vpdpbusd` multiply, in its order: the same bits.
//! Tokens past the last whole 16 go to the `vpdpbusd` multiply, and so do weight groups of 16 (a
//! tile product of half a block costs what one of a whole block does, with twice the stores:
//! slower than `vpdpbusd` on them).

use std::arch::asm;
use std::arch::x86_64::*;
use std::mem::MaybeUninit;
use std::sync::OnceLock;

use super::avx2::{multiply_vnni_checked, zmm};
use super::{Acc, Chunk, Unpacked, CHUNK, GROUP_BYTES};
use crate::int8::{ActBlock, BLOCK};
use crate::isa::{has_avx512_vnni, Isa};
use crate::lut::layout::{TABLES_PER_ACT, TILE};

/// Tokens per tile: the rows of the activation and product tiles.
const TOKENS: usize = 16;
/// Weight rows per product tile (its 16 int32 columns).
const ROWS: usize = 16;
/// Bytes from one column quad of the unpacked codes to the next.
const QUAD_STRIDE: usize = TILE * 4;

/// Whether this CPU has AMX tiles with int8 products and the operating system grants this
/// process their state. The grant is the process's, asked for once (`arch_prctl`); without it a
/// tile instruction faults.
pub(crate) fn has_amx() -> bool {
    static GRANTED: OnceLock<bool> = OnceLock::new();
    *GRANTED.get_or_init(|| {
        // CPUID leaf 7: EDX bit 24 is AMX-TILE, bit 25 AMX-INT8.
        let leaf7 = __cpuid_count(7, 0);
        let tiles = (leaf7.edx >> 24) & 3 == 3;
        tiles && has_avx512_vnni() && Isa::Avx2.is_supported() && request_tile_state()
    })
}

/// Asks Linux for permission to use the AMX tile data state (`ARCH_REQ_XCOMP_PERM` for
/// `XFEATURE_XTILEDATA`); false where it refuses (an older kernel, or a hypervisor that does not
/// expose the state).
fn request_tile_state() -> bool {
    const ARCH_REQ_XCOMP_PERM: libc::c_long = 0x1023;
    const XFEATURE_XTILEDATA: libc::c_long = 18;
    // SAFETY: this `arch_prctl` request passes two integers and touches no memory of this
    // process; it only changes which register state the kernel lets the process use.
    let status = unsafe {
        libc::syscall(
            libc::SYS_arch_prctl,
            ARCH_REQ_XCOMP_PERM,
            XFEATURE_XTILEDATA,
        )
    };
    status == 0
}

/// A 64-byte tile configuration (palette 1): `tmm0`–`tmm3` the products (16 tokens × 16 int32),
/// `tmm4` the activations (16 tokens × 32 columns), `tmm5`–`tmm7` the codes (8 column quads × 16
/// rows of 4 bytes).
#[repr(C, align(64))]
struct TileConfig([u8; 64]);

/// The one configuration every multiply loads.
static TILE_CONFIG: TileConfig = {
    let mut bytes = [0u8; 64];
    bytes[0] = 1;
    // (rows, bytes per row) of tmm0..tmm7.
    let shapes = [
        (TOKENS, 4 * ROWS),
        (TOKENS, 4 * ROWS),
        (TOKENS, 4 * ROWS),
        (TOKENS, 4 * ROWS),
        (TOKENS, BLOCK),
        (TABLES_PER_ACT, 4 * ROWS),
        (TABLES_PER_ACT, 4 * ROWS),
        (TABLES_PER_ACT, 4 * ROWS),
    ];
    let mut tile = 0;
    while tile < 8 {
        let (rows, row_bytes) = shapes[tile];
        bytes[16 + 2 * tile] = row_bytes as u8;
        bytes[17 + 2 * tile] = (row_bytes >> 8) as u8;
        bytes[48 + tile] = rows as u8;
        tile += 1;
    }
    TileConfig(bytes)
};

/// The int32 products of one group of tokens, `[activation group][token][row]`.
#[repr(C, align(64))]
struct Products([MaybeUninit<Part>; CHUNK]);

/// One activation group's products: `[token][row]`.
type Part = [[i32; TILE]; TOKENS];

/// The AMX multiply (the `vpdpbusd` one for the tokens past the last whole 16, and for weight
/// groups of 16); the caller checked [`has_amx`].
pub(super) fn multiply_amx_checked(u: &Unpacked, chunk: Chunk<'_>, acc: &mut Acc) {
    assert!(
        chunk.fits(acc.len()) && has_amx(),
        "AMX multiply outside its checks"
    );
    let tokens = chunk.tokens();
    let whole = match u.halves == 1 && centred_fit_bytes(u) {
        true => tokens / TOKENS * TOKENS,
        false => 0,
    };
    if whole > 0 {
        let head = Chunk {
            x: &chunk.x[..whole * chunk.per_row],
            ..chunk
        };
        // SAFETY: `has_amx` checked the CPU's AMX-TILE, AMX-INT8, AVX-512 F/BW/VL/VNNI, AVX2,
        // FMA and F16C and the kernel's grant of the tile state; `head` fits `acc` (checked
        // above, `whole` ≤ tokens) and holds whole groups of 16 tokens, which the tile loads
        // rely on. Tile registers are per thread: concurrent callers each configure and release
        // their own.
        unsafe { multiply_tiles(u, head, acc) }
    }
    if whole < tokens {
        let tail = Chunk {
            x: &chunk.x[whole * chunk.per_row..],
            ..chunk
        };
        multiply_vnni_checked(u, tail, &mut acc[whole..]);
    }
}

/// Whether the centred codes `factor·q − top` of `u` fit signed bytes: codes of up to 7 bits
/// counted twice (`2q − top`, odd values within ±127), and wide codes offset by 128 (`q − 128`,
/// the codes' own signed values).
fn centred_fit_bytes(u: &Unpacked) -> bool {
    (u.factor == 2 && u.top <= 127) || (u.factor == 1 && u.top == 128)
}

/// `factor·q − top` of the chunk's codes as signed bytes (checked to fit by the caller): their
/// products with the activation codes are the blocks' integer dots `D` themselves.
#[repr(C, align(64))]
struct CentredCodes([[i8; GROUP_BYTES]; CHUNK]);

impl CentredCodes {
    /// The centred codes of the first `count` activation groups of `u` (the rest zero).
    #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
    fn new(u: &Unpacked, count: usize) -> CentredCodes {
        let mut centred = CentredCodes([[0; GROUP_BYTES]; CHUNK]);
        let top = _mm512_set1_epi8(u.top as i8);
        for (to, from) in centred.0.iter_mut().zip(&u.codes).take(count) {
            for (to, from) in to.chunks_exact_mut(64).zip(from.chunks_exact(64)) {
                let q = zmm::load_codes(from);
                // Byte arithmetic wraps: `factor·q` ≤ 255 and the difference is inside ±128.
                let q = match u.factor {
                    2 => _mm512_add_epi8(q, q),
                    _ => q,
                };
                let d = _mm512_sub_epi8(q, top);
                // SAFETY: 64 bytes of `to` (`chunks_exact_mut(64)`).
                unsafe { _mm512_storeu_si512(to.as_mut_ptr().cast(), d) };
            }
        }
        centred
    }
}

/// The multiply over whole groups of 16 tokens and whole blocks: for each group, the products of
/// every activation group of the chunk, then their finishing.
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
fn multiply_tiles(u: &Unpacked, chunk: Chunk<'_>, acc: &mut Acc) {
    let codes = CentredCodes::new(u, chunk.count);
    let finish = match chunk.count {
        1 => finish::<1>,
        2 => finish::<2>,
        3 => finish::<3>,
        _ => finish::<4>,
    };
    // Written by the tile stores before each read: not zeroed.
    let mut products = Products([const { MaybeUninit::uninit() }; CHUNK]);
    // SAFETY: the configuration is a valid palette-1 layout of 64 bytes, 64-aligned.
    unsafe { asm!("ldtilecfg [{0}]", in(reg) TILE_CONFIG.0.as_ptr(), options(nostack, readonly)) };
    for n0 in (0..chunk.tokens()).step_by(TOKENS) {
        for c in 0..chunk.count {
            group_products(&codes, chunk, n0, c, &mut products);
        }
        // SAFETY: `group_products` stored every token and row of parts 0..count just above
        // (`MaybeUninit<Part>` has the layout of `Part`).
        let written: &[Part] =
            unsafe { std::slice::from_raw_parts(products.0.as_ptr().cast(), chunk.count) };
        finish(u, chunk, written, n0, &mut acc[n0..n0 + TOKENS]);
    }
    // SAFETY: releases this thread's tile state, configured above.
    unsafe { asm!("tilerelease", options(nostack, nomem)) };
}

/// The int32 products of tokens `n0..n0 + 16` by the 64 rows for activation group `c` of the
/// chunk, into `products.0[c]`. The caller loaded [`TILE_CONFIG`].
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
fn group_products(
    codes: &CentredCodes,
    chunk: Chunk<'_>,
    n0: usize,
    c: usize,
    products: &mut Products,
) {
    let act_stride = chunk.per_row * size_of::<ActBlock>();
    let first = n0 * chunk.per_row + chunk.a0 + c;
    let last = first + (TOKENS - 1) * chunk.per_row;
    assert!(last < chunk.x.len() && c < chunk.count && std::mem::offset_of!(ActBlock, q) == 0);
    // From the whole run of blocks the tile reads: block `first`'s codes and the blocks after it
    // (`ActBlock` is `repr(C)` with its codes first).
    let acts = chunk.x[first..=last].as_ptr();
    let codes = &codes.0[c];
    let out = products.0[c].as_mut_ptr();
    // SAFETY: the tiles were configured by the caller (`multiply_tiles`, whose features `has_amx`
    // checked). The activation tile reads the 32 codes of blocks `first + m·per_row` for m < 16,
    // all within `first..=last` (asserted in `x` above); each code tile reads 8 rows of 64 bytes,
    // `QUAD_STRIDE` apart, from byte 0, 64, 128 or 192 of `codes`, at most byte
    // 7·256 + 192 + 63 < GROUP_BYTES; each product tile writes 16 rows of 64 bytes `TILE·4` apart,
    // from byte 0, 64, 128 or 192 of `out`, one `Part` of 16 × `TILE·4` bytes.
    unsafe {
        asm!(
            "tileloadd tmm4, [{a} + {sa}*1]",
            "tileloadd tmm5, [{b} + {sb}*1]",
            "tileloadd tmm6, [{b} + {sb}*1 + 64]",
            "tileloadd tmm7, [{b} + {sb}*1 + 128]",
            "tilezero tmm0",
            "tilezero tmm1",
            "tilezero tmm2",
            "tilezero tmm3",
            "tdpbssd tmm0, tmm4, tmm5",
            "tileloadd tmm5, [{b} + {sb}*1 + 192]",
            "tdpbssd tmm1, tmm4, tmm6",
            "tdpbssd tmm2, tmm4, tmm7",
            "tdpbssd tmm3, tmm4, tmm5",
            "tilestored [{c} + {sc}*1], tmm0",
            "tilestored [{c} + {sc}*1 + 64], tmm1",
            "tilestored [{c} + {sc}*1 + 128], tmm2",
            "tilestored [{c} + {sc}*1 + 192], tmm3",
            a = in(reg) acts,
            sa = in(reg) act_stride,
            b = in(reg) codes.as_ptr(),
            sb = in(reg) QUAD_STRIDE,
            c = in(reg) out,
            sc = in(reg) TILE * 4,
            options(nostack),
        );
    }
}

/// Adds the products of tokens `n0..n0 + 16` of `C` activation groups (the chunk's count) to
/// their accumulators `acc`: per row and token, in block order, `acc = fma(D, (s/2)·d_x, acc);
/// acc = fma(o, Σx, acc)`, by the `vpdpbusd` multiply's own operations. Each group's scales and
/// offsets for 16 rows stay in registers while the tokens go by.
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
fn finish<const C: usize>(
    u: &Unpacked,
    chunk: Chunk<'_>,
    products: &[Part],
    n0: usize,
    acc: &mut Acc,
) {
    assert!(chunk.count == C && products.len() == C && u.halves == 1);
    for rv in 0..TILE / zmm::L {
        let rows = zmm::L * rv..zmm::L * (rv + 1);
        let scale: [_; C] = std::array::from_fn(|c| zmm::load_ps(&u.scale[2 * c][rows.clone()]));
        let offset: [_; C] = std::array::from_fn(|c| zmm::load_ps(&u.offset[2 * c][rows.clone()]));
        for t in 0..TOKENS {
            let out = &mut acc[t][rows.clone()];
            let mut a = zmm::load_ps(out);
            for c in 0..C {
                let block = chunk.block(n0 + t, c);
                let dot = zmm::load_codes(bytemuck::cast_slice(&products[c][t][rows.clone()]));
                let step = zmm::mul_ps(scale[c], zmm::set1_ps(block.d));
                a = zmm::fmadd_ps(zmm::cvt(dot), step, a);
                a = zmm::fmadd_ps(offset[c], zmm::set1_ps(block.xsum), a);
            }
            zmm::store_ps(out, a);
        }
    }
}
