//! CPU matmul kernels of our own for the 32-value block formats Q4_0, Q4_1, Q5_0, Q5_1 and
//! Q8_0 (candle
//! 0.11's Q4_1 dot product is a scalar loop, and its prompt-processing path re-unpacks every
//! weight block for every activation row).
//!
//! Activations are quantized to 8-bit blocks as llama.cpp does (`q8_0`/`q8_1`: per-32 scale
//! `amax/127` kept at f16 precision, rounding to nearest even; for Q4_1 also the block sum).
//! Weight quants are used as unsigned bytes `u` and each block contributes an exact integer
//! dot `I = sum(u * q_x)` plus a correction:
//!
//! | format | block contribution |
//! |---|---|
//! | Q4_1 | `d_w d_x I + m_w s_x` |
//! | Q4_0 | `d_w d_x (I - 8 sum(q_x))` (nibbles are stored offset by 8) |
//! | Q5_1 | `d_w d_x I + m_w s_x` (fifth bits from `qh`) |
//! | Q5_0 | `d_w d_x (I - 16 sum(q_x))` |
//! | Q8_0 | `d_w d_x (I - 128 sum(q_x))` with `u = w + 128` |
//!
//! The offset terms are removed in integers (a second VNNI dot against a constant), never as
//! a float correction: Q4_0 and Q8_0 sums nearly cancel their offsets, and a float correction
//! loses enough bits to move the logits measurably. Without VNNI, Q4_0, Q5_0 and Q8_0 use signed
//! values and the sign trick (`maddubs(|w|, sign(y, w))`), as ggml does.
//!
//! The x86-64 paths are picked at run time with `is_x86_feature_detected!`, so a portable
//! build still uses them: AVX-512 (F/BW/VL/VNNI) runs 512-bit kernels over groups of 16 weight
//! rows (and 512-bit f16 tiles); AVX-512 VNNI alone runs the 256-bit VNNI kernels over groups of
//! 8 rows; AVX2/FMA/F16C the `maddubs` versions; other machines the scalar path, which computes
//! the same integers. Work items are tiles of activation rows x weight rows, so a weight block
//! is unpacked once per tile rather than once per row, spread over our thread pool
//! (`crate::pool`). [`crate::Kernel`] (`ModelOptions::kernel`) forces a path, or candle's kernels
//! everywhere.

use candle_core::quantized::GgmlDType;
use candle_core::{Device, Tensor};
use half::f16;

use crate::error::{Error, Result};
use crate::pool::for_each_chunk_mut;

mod q4k;
mod q6k;

const QK: usize = 32;

/// The block formats these kernels run.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) enum BlockFmt {
    Q4_0,
    Q4_1,
    Q5_0,
    Q5_1,
    Q8_0,
}

impl BlockFmt {
    pub(crate) fn from_ggml(t: GgmlDType) -> Option<Self> {
        match t {
            GgmlDType::Q4_0 => Some(BlockFmt::Q4_0),
            GgmlDType::Q4_1 => Some(BlockFmt::Q4_1),
            GgmlDType::Q5_0 => Some(BlockFmt::Q5_0),
            GgmlDType::Q5_1 => Some(BlockFmt::Q5_1),
            GgmlDType::Q8_0 => Some(BlockFmt::Q8_0),
            _ => None,
        }
    }

    pub(crate) fn ggml(self) -> GgmlDType {
        match self {
            BlockFmt::Q4_0 => GgmlDType::Q4_0,
            BlockFmt::Q4_1 => GgmlDType::Q4_1,
            BlockFmt::Q5_0 => GgmlDType::Q5_0,
            BlockFmt::Q5_1 => GgmlDType::Q5_1,
            BlockFmt::Q8_0 => GgmlDType::Q8_0,
        }
    }

    const fn bytes(self) -> usize {
        match self {
            BlockFmt::Q4_0 => 18,
            BlockFmt::Q4_1 => 20,
            BlockFmt::Q5_0 => 22,
            BlockFmt::Q5_1 => 24,
            BlockFmt::Q8_0 => 34,
        }
    }

    /// Formats with a per-block minimum (`m_w s_x` term).
    const fn has_min(self) -> bool {
        matches!(self, BlockFmt::Q4_1 | BlockFmt::Q5_1)
    }

    /// Unsigned quants of block `wb`, element order, and the format's offset.
    fn unsigned_quants(self, wb: &[u8]) -> ([u8; QK], i32) {
        let mut u = [0u8; QK];
        let (qs, qh, off): (&[u8], u32, i32) = match self {
            BlockFmt::Q4_0 => (&wb[2..18], 0, 8),
            BlockFmt::Q4_1 => (&wb[4..20], 0, 0),
            BlockFmt::Q5_0 => (
                &wb[6..22],
                u32::from_le_bytes([wb[2], wb[3], wb[4], wb[5]]),
                16,
            ),
            BlockFmt::Q5_1 => (
                &wb[8..24],
                u32::from_le_bytes([wb[4], wb[5], wb[6], wb[7]]),
                0,
            ),
            BlockFmt::Q8_0 => {
                for (o, &q) in u.iter_mut().zip(&wb[2..34]) {
                    *o = q ^ 0x80;
                }
                return (u, 128);
            }
        };
        for j in 0..QK / 2 {
            u[j] = (qs[j] & 0x0F) | ((((qh >> j) & 1) as u8) << 4);
            u[j + QK / 2] = (qs[j] >> 4) | ((((qh >> (j + QK / 2)) & 1) as u8) << 4);
        }
        (u, off)
    }
}

/// One activation block.
#[derive(Clone, Copy)]
#[repr(C, align(16))]
struct XBlock {
    /// Scale (f16 precision).
    d: f32,
    /// `d * sum(qs)` at f16 precision (ggml's q8_1 `s`), for Q4_1.
    s: f32,
    /// `sum(qs)`, for the offset formats.
    sum: i32,
    _pad: f32,
    qs: [i8; QK],
}

const ZERO_X: XBlock = XBlock {
    d: 0.0,
    s: 0.0,
    sum: 0,
    _pad: 0.0,
    qs: [0; QK],
};

/// llama.cpp's activation quantization (q8_0 / q8_1 blocks).
fn quantize_row(x: &[f32], out: &mut [XBlock]) {
    #[cfg(target_arch = "x86_64")]
    if isa() != Isa::Scalar {
        for (xb, ob) in x.chunks_exact(QK).zip(out.iter_mut()) {
            // SAFETY: avx2/fma/f16c were detected at run time; `xb` holds 32 values.
            unsafe { quantize_block_avx2(xb, ob) };
        }
        return;
    }
    quantize_row_scalar(x, out)
}

/// The same as [`quantize_row_scalar`] for one block, eight lanes at a time (the rounding,
/// nearest with ties to even, is the one ggml's x86 code uses too).
#[cfg(target_arch = "x86_64")]
/// # Safety
/// The CPU supports `avx2,fma,f16c` (the caller checked at run time). `xb` holds 32 values.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn quantize_block_avx2(xb: &[f32], ob: &mut XBlock) {
    use std::arch::x86_64::*;
    let p = xb.as_ptr();
    let v = [
        _mm256_loadu_ps(p),
        _mm256_loadu_ps(p.add(8)),
        _mm256_loadu_ps(p.add(16)),
        _mm256_loadu_ps(p.add(24)),
    ];
    let sign = _mm256_set1_ps(-0.0);
    let mut mx = _mm256_andnot_ps(sign, v[0]);
    for x in &v[1..] {
        mx = _mm256_max_ps(mx, _mm256_andnot_ps(sign, *x));
    }
    let m4 = _mm_max_ps(_mm256_castps256_ps128(mx), _mm256_extractf128_ps::<1>(mx));
    let m2 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
    let amax = _mm_cvtss_f32(_mm_max_ss(m2, _mm_shuffle_ps::<1>(m2, m2)));
    let id = _mm256_set1_ps(if amax != 0.0 { 127.0 / amax } else { 0.0 });
    let q: [__m256i; 4] = std::array::from_fn(|i| {
        _mm256_cvtps_epi32(_mm256_round_ps::<
            { _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC },
        >(_mm256_mul_ps(v[i], id)))
    });
    let s = _mm256_add_epi32(_mm256_add_epi32(q[0], q[1]), _mm256_add_epi32(q[2], q[3]));
    let s4 = _mm_add_epi32(_mm256_castsi256_si128(s), _mm256_extracti128_si256::<1>(s));
    let s2 = _mm_add_epi32(s4, _mm_shuffle_epi32::<0b01_00_11_10>(s4));
    let sum = _mm_cvtsi128_si32(_mm_add_epi32(s2, _mm_shuffle_epi32::<0b00_00_00_01>(s2)));
    // i32 -> i8 with the lane order restored after the in-lane packs.
    let p16a = _mm256_packs_epi32(q[0], q[1]);
    let p16b = _mm256_packs_epi32(q[2], q[3]);
    let p8 = _mm256_packs_epi16(p16a, p16b);
    let fixed = _mm256_permutevar8x32_epi32(p8, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
    _mm256_storeu_si256(ob.qs.as_mut_ptr() as *mut __m256i, fixed);
    let d = amax / 127.0;
    ob.d = f16::from_f32(d).to_f32();
    ob.s = f16::from_f32(d * sum as f32).to_f32();
    ob.sum = sum;
}

fn quantize_row_scalar(x: &[f32], out: &mut [XBlock]) {
    for (xb, ob) in x.chunks_exact(QK).zip(out.iter_mut()) {
        let amax = xb.iter().fold(0f32, |m, v| m.max(v.abs()));
        let id = if amax != 0.0 { 127.0 / amax } else { 0.0 };
        let mut sum = 0i32;
        for (q, &v) in ob.qs.iter_mut().zip(xb) {
            let r = (v * id).round_ties_even() as i32;
            *q = r as i8;
            sum += r;
        }
        // As ggml: both stored at f16 precision, `s` from the unrounded scale.
        let d = amax / 127.0;
        ob.d = f16::from_f32(d).to_f32();
        ob.s = f16::from_f32(d * sum as f32).to_f32();
        ob.sum = sum;
    }
}

pub(crate) use crate::exec::Isa;

/// Whether our kernels run in the current call (not candle's: [`crate::Kernel::Candle`]).
pub(crate) fn enabled() -> bool {
    crate::exec::current().ours()
}

/// The SIMD level of the current call.
pub(crate) fn isa() -> Isa {
    crate::exec::current().isa
}

/// Whether weights are regrouped into the SIMD kernels' row groups at load.
pub(crate) fn repack() -> bool {
    crate::exec::current().repack
}

/// Whether the 512-bit AVX-512 paths run.
pub(crate) fn wide() -> bool {
    #[cfg(target_arch = "x86_64")]
    return isa() == Isa::Avx512;
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// Whether the x86-64 SIMD paths (AVX2, FMA, F16C at least) run.
pub(crate) fn simd() -> bool {
    isa() != Isa::Scalar
}

fn f16_at(p: &[u8], off: usize) -> f32 {
    f16::from_le_bytes([p[off], p[off + 1]]).to_f32()
}

/// Scalar dot of one weight row with one activation row (exact integer block sums).
fn dot_scalar(fmt: BlockFmt, w: &[u8], x: &[XBlock]) -> f32 {
    let mut acc = 0f32;
    for (wb, xb) in w.chunks_exact(fmt.bytes()).zip(x) {
        let d = f16_at(wb, 0);
        let (u, off) = fmt.unsigned_quants(wb);
        let mut sumi = 0i32;
        let mut sumx = 0i32;
        for (&a, &y) in u.iter().zip(&xb.qs) {
            sumi += a as i32 * y as i32;
            sumx += y as i32;
        }
        acc += d * xb.d * (sumi - off * sumx) as f32;
        if fmt.has_min() {
            acc += f16_at(wb, 2) * xb.s;
        }
    }
    acc
}

/// How far ahead of the weights they read (bytes) the decode kernels ask for the cache lines.
/// A decode step streams every weight once; with the unpacking and multiply work between its
/// loads, the out-of-order window alone keeps too few cache misses in flight to reach the
/// memory bandwidth (measured here, 2 threads: f16 decode +25%, Q8_0 +25%, Q4_1 +40%).
const PREFETCH_AHEAD: usize = 4096;

/// Asks for the cache lines of `len` bytes [`PREFETCH_AHEAD`] past `p`; called for each piece of
/// weights a decode kernel reads, so the lines asked for run on without gaps.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
pub(crate) fn prefetch_ahead(p: *const u8, len: usize) {
    use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};
    let mut at = 0;
    while at < len {
        // SAFETY: a prefetch is a hint that never faults, whatever the address (which may lie
        // past the end of the matrix, hence `wrapping_add`).
        unsafe { _mm_prefetch::<_MM_HINT_T0>(p.wrapping_add(PREFETCH_AHEAD + at) as *const i8) };
        at += 64;
    }
}

/// The SIMD tile kernels: `R` activation rows times `C` weight rows over `nb` blocks.
#[cfg(target_arch = "x86_64")]
macro_rules! simd_tile {
    ($name:ident, $features:literal, $vnni:expr) => {
        /// # Safety
        /// The CPU supports the features this instance is compiled for (the caller checked at run
        /// time). `w` points at `C` rows of `nb` blocks of `fmt` and every `x` at a row of `nb`
        /// activation blocks.
        #[target_feature(enable = $features)]
        unsafe fn $name<const R: usize, const C: usize>(
            fmt: BlockFmt,
            w: [*const u8; C],
            x: [*const XBlock; R],
            nb: usize,
            out: &mut [[f32; C]; R],
        ) {
            use std::arch::x86_64::*;
            let bytes = fmt.bytes();
            let mask = _mm_set1_epi8(0x0F);
            let ones = _mm256_set1_epi16(1);
            let flip = _mm256_set1_epi8(-128);
            let eight = _mm256_set1_epi8(8);
            let sixteen = _mm256_set1_epi8(16);
            // Byte i of the result takes byte i / 8 of the 32-bit mask; `bit_select` has every
            // bit but bit i % 8 set, so a byte is all ones exactly when its bit was set.
            let bit_spread = _mm256_set_epi64x(
                0x0303030303030303,
                0x0202020202020202,
                0x0101010101010101,
                0x0000000000000000,
            );
            let bit_select = _mm256_set1_epi64x(0x7fbfdfeff7fbfdfe);
            let mut acc = [[_mm256_setzero_ps(); C]; R];
            let mut corr = [[0f32; C]; R];
            for b in 0..nb {
                let mut wq = [_mm256_setzero_si256(); C];
                let mut dw = [0f32; C];
                let mut mw = [0f32; C];
                for c in 0..C {
                    let p = w[c].add(b * bytes);
                    match fmt {
                        BlockFmt::Q4_1 => {
                            let dm =
                                _mm_cvtph_ps(_mm_cvtsi32_si128((p as *const i32).read_unaligned()));
                            dw[c] = _mm_cvtss_f32(dm);
                            mw[c] = _mm_cvtss_f32(_mm_shuffle_ps::<1>(dm, dm));
                            let q = _mm_loadu_si128(p.add(4) as *const __m128i);
                            let lo = _mm_and_si128(q, mask);
                            let hi = _mm_and_si128(_mm_srli_epi16::<4>(q), mask);
                            wq[c] = _mm256_set_m128i(hi, lo);
                        }
                        BlockFmt::Q4_0 => {
                            dw[c] = _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(
                                (p as *const u16).read_unaligned() as i32,
                            )));
                            let q = _mm_loadu_si128(p.add(2) as *const __m128i);
                            let lo = _mm_and_si128(q, mask);
                            let hi = _mm_and_si128(_mm_srli_epi16::<4>(q), mask);
                            let u = _mm256_set_m128i(hi, lo);
                            // VNNI: unsigned nibbles, offset removed exactly below; AVX2:
                            // signed values for the sign trick.
                            wq[c] = if $vnni { u } else { _mm256_sub_epi8(u, eight) };
                        }
                        BlockFmt::Q8_0 => {
                            dw[c] = _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(
                                (p as *const u16).read_unaligned() as i32,
                            )));
                            let q = _mm256_loadu_si256(p.add(2) as *const __m256i);
                            wq[c] = if $vnni { _mm256_xor_si256(q, flip) } else { q };
                        }
                        BlockFmt::Q5_0 | BlockFmt::Q5_1 => {
                            let (qh_at, qs_at) = if fmt == BlockFmt::Q5_0 {
                                (2, 6)
                            } else {
                                (4, 8)
                            };
                            let dm =
                                _mm_cvtph_ps(_mm_cvtsi32_si128((p as *const i32).read_unaligned()));
                            dw[c] = _mm_cvtss_f32(dm);
                            mw[c] = _mm_cvtss_f32(_mm_shuffle_ps::<1>(dm, dm));
                            let q = _mm_loadu_si128(p.add(qs_at) as *const __m128i);
                            let lo = _mm_and_si128(q, mask);
                            let hi = _mm_and_si128(_mm_srli_epi16::<4>(q), mask);
                            // The fifth bits: bit j of qh becomes 0x10 in byte j.
                            let qh = (p.add(qh_at) as *const i32).read_unaligned();
                            let bytes = _mm256_shuffle_epi8(_mm256_set1_epi32(qh), bit_spread);
                            let set = _mm256_cmpeq_epi8(
                                _mm256_or_si256(bytes, bit_select),
                                _mm256_set1_epi64x(-1),
                            );
                            let u = _mm256_or_si256(
                                _mm256_set_m128i(hi, lo),
                                _mm256_and_si256(set, sixteen),
                            );
                            wq[c] = if $vnni || fmt == BlockFmt::Q5_1 {
                                u
                            } else {
                                _mm256_sub_epi8(u, sixteen)
                            };
                        }
                    }
                }
                for r in 0..R {
                    let xb = &*x[r].add(b);
                    let y = _mm256_loadu_si256(xb.qs.as_ptr() as *const __m256i);
                    // Exact integer offset terms (VNNI): sum(8 * y) for Q4_0, sum(128 * y) for Q8_0.
                    let yoff = match fmt {
                        BlockFmt::Q4_0 if $vnni => {
                            _mm256_dpbusd_epi32(_mm256_setzero_si256(), eight, y)
                        }
                        BlockFmt::Q8_0 if $vnni => {
                            _mm256_dpbusd_epi32(_mm256_setzero_si256(), flip, y)
                        }
                        BlockFmt::Q5_0 if $vnni => {
                            _mm256_dpbusd_epi32(_mm256_setzero_si256(), sixteen, y)
                        }
                        _ => _mm256_setzero_si256(),
                    };
                    for c in 0..C {
                        let p32 = if $vnni {
                            _mm256_sub_epi32(
                                _mm256_dpbusd_epi32(_mm256_setzero_si256(), wq[c], y),
                                yoff,
                            )
                        } else if !fmt.has_min() {
                            let aw = _mm256_sign_epi8(wq[c], wq[c]);
                            let sy = _mm256_sign_epi8(y, wq[c]);
                            _mm256_madd_epi16(_mm256_maddubs_epi16(aw, sy), ones)
                        } else {
                            _mm256_madd_epi16(_mm256_maddubs_epi16(wq[c], y), ones)
                        };
                        acc[r][c] = _mm256_fmadd_ps(
                            _mm256_set1_ps(dw[c] * xb.d),
                            _mm256_cvtepi32_ps(p32),
                            acc[r][c],
                        );
                        if fmt.has_min() {
                            corr[r][c] += mw[c] * xb.s;
                        }
                    }
                }
            }
            for r in 0..R {
                for c in 0..C {
                    let v = acc[r][c];
                    let s4 = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
                    let s2 = _mm_add_ps(s4, _mm_movehl_ps(s4, s4));
                    let s1 = _mm_add_ss(s2, _mm_shuffle_ps::<1>(s2, s2));
                    out[r][c] = _mm_cvtss_f32(s1) + corr[r][c];
                }
            }
        }
    };
}

#[cfg(target_arch = "x86_64")]
simd_tile!(tile_avx2, "avx2,fma,f16c", false);
#[cfg(target_arch = "x86_64")]
simd_tile!(tile_vnni, "avx2,fma,f16c,avx512vnni,avx512vl", true);

/// Weight rows per interleaved group.
///
/// Matrices with `n % G == 0` are stored as interleaved groups of 8 rows. Group layout, per
/// block: the 8 f16 scales, for Q4_1/Q5_1 the 8 f16 minimums, for Q5 the 8 fifth-bit words
/// (rearranged per quant piece, see [`qh_to_pieces`]), then the quants in 4-byte pieces, piece
/// `j` of rows 0..8 side by side (Q4/Q5: the 16 bytes of a row are pieces 0..4, byte `i`
/// holding elements `i` and `i + 16`; Q8_0: 32 bytes, pieces 0..8). One 32-byte load then
/// holds the same four elements of eight rows, so the integer dot of one activation block with
/// eight weight rows is eight `dpbusd` against a broadcast of four activation bytes, with each
/// row's sum in its own lane: no horizontal sums, and one scale multiply per eight rows. Same
/// size as the GGUF blocks.
const G: usize = 8;

/// Rows per interleaved group for the 512-bit kernels.
const G16: usize = 16;

/// Byte offsets inside a block of a group of `gs` rows: the fifth-bit words (Q5), then the
/// quants.
const fn group_qh_at(fmt: BlockFmt, gs: usize) -> usize {
    if fmt.has_min() {
        4 * gs
    } else {
        2 * gs
    }
}

const fn has_qh(fmt: BlockFmt) -> bool {
    matches!(fmt, BlockFmt::Q5_0 | BlockFmt::Q5_1)
}

const fn group_quants_at(fmt: BlockFmt, gs: usize) -> usize {
    group_qh_at(fmt, gs) + if has_qh(fmt) { 4 * gs } else { 0 }
}

/// A Q5 block's fifth bits rearranged so that byte `p` serves quant piece `p`: its low four
/// bits are the fifth bits of elements `4p..4p+4` (the low nibbles of the piece), its high
/// four those of elements `16+4p..16+4p+4` (the high nibbles).
fn qh_to_pieces(qh: u32) -> u32 {
    (0..4).fold(0u32, |acc, p| {
        let lo = (qh >> (4 * p)) & 0xF;
        let hi = (qh >> (16 + 4 * p)) & 0xF;
        acc | ((lo | (hi << 4)) << (8 * p))
    })
}

fn qh_from_pieces(v: u32) -> u32 {
    (0..4).fold(0u32, |acc, p| {
        let b = (v >> (8 * p)) & 0xFF;
        acc | ((b & 0xF) << (4 * p)) | ((b >> 4) << (16 + 4 * p))
    })
}

/// Bytes before the quants in a GGUF block (scale, minimum, fifth bits).
const fn head_bytes(fmt: BlockFmt) -> usize {
    group_quants_at(fmt, 1)
}

/// Bytes copied out of a source between calls to its `release`.
const RELEASE_CHUNK: usize = 1 << 20;

/// GGUF rows (`k` values each, `n % gs == 0`) rearranged into interleaved groups of `gs`;
/// `release(start, len)` is called for each consumed range of `data`.
fn interleave(
    fmt: BlockFmt,
    data: &[u8],
    k: usize,
    gs: usize,
    release: &dyn Fn(usize, usize),
) -> Vec<u8> {
    let (bytes, nb) = (fmt.bytes(), k / QK);
    let (qh_at, qat, head) = (
        group_qh_at(fmt, gs),
        group_quants_at(fmt, gs),
        head_bytes(fmt),
    );
    let quant_bytes = bytes - head;
    let mut out = vec![0u8; data.len()];
    let mut released = 0;
    for (g, dst) in out.chunks_exact_mut(nb * gs * bytes).enumerate() {
        let done = g * nb * gs * bytes;
        if done - released >= RELEASE_CHUNK {
            release(released, done - released);
            released = done;
        }
        for (b, gb) in dst.chunks_exact_mut(gs * bytes).enumerate() {
            for i in 0..gs {
                let src = &data[((g * gs + i) * nb + b) * bytes..][..bytes];
                gb[2 * i..2 * i + 2].copy_from_slice(&src[..2]);
                if fmt.has_min() {
                    gb[2 * gs + 2 * i..2 * gs + 2 * i + 2].copy_from_slice(&src[2..4]);
                }
                if has_qh(fmt) {
                    let at = head - 4;
                    let qh = u32::from_le_bytes([src[at], src[at + 1], src[at + 2], src[at + 3]]);
                    gb[qh_at + 4 * i..qh_at + 4 * i + 4]
                        .copy_from_slice(&qh_to_pieces(qh).to_le_bytes());
                }
                let qs = &src[head..];
                for j in 0..quant_bytes / 4 {
                    let at = qat + (j * gs + i) * 4;
                    gb[at..at + 4].copy_from_slice(&qs[4 * j..4 * j + 4]);
                }
            }
        }
    }
    release(released, data.len() - released);
    out
}

/// Formats as const parameters of the group kernels, so that each is compiled on its own.
const F_Q4_0: u8 = 0;
const F_Q4_1: u8 = 1;
const F_Q5_0: u8 = 2;
const F_Q5_1: u8 = 3;
const F_Q8_0: u8 = 4;

const fn fmt_of(f: u8) -> BlockFmt {
    match f {
        F_Q4_0 => BlockFmt::Q4_0,
        F_Q4_1 => BlockFmt::Q4_1,
        F_Q5_0 => BlockFmt::Q5_0,
        F_Q5_1 => BlockFmt::Q5_1,
        _ => BlockFmt::Q8_0,
    }
}

/// The SIMD kernels over interleaved groups: `R` activation rows times the 8 rows of the group
/// starting at `w`, over `nb` blocks. Each row's integer sums run in `S` independent chains
/// (pieces `t % S`), so the `dpbusd` latency does not bound a small tile.
#[cfg(target_arch = "x86_64")]
macro_rules! simd_group {
    ($name:ident, $features:literal, $vnni:expr) => {
        /// # Safety
        /// The CPU supports the features this instance is compiled for (the caller checked at run
        /// time). `w` starts a group of `nb` blocks of format `F` and every `x` a row of `nb`
        /// blocks.
        #[target_feature(enable = $features)]
        unsafe fn $name<const F: u8, const R: usize, const S: usize>(
            w: *const u8,
            x: [*const XBlock; R],
            nb: usize,
            out: &mut [[f32; G]; R],
        ) {
            use std::arch::x86_64::*;
            let fmt = const { fmt_of(F) };
            let gb = fmt.bytes() * G;
            let qat = group_quants_at(fmt, G);
            let qh_at = group_qh_at(fmt, G);
            let mask = _mm256_set1_epi8(0x0F);
            let eight = _mm256_set1_epi8(8);
            let sixteen = _mm256_set1_epi8(16);
            let flip = _mm256_set1_epi8(-128);
            let ones = _mm256_set1_epi16(1);
            // Fifth bits: byte p of each lane's word spread over the lane's four bytes, then
            // bit i (low nibbles) or bit 4 + i (high nibbles) of byte i tested.
            let spread: [__m256i; 4] = std::array::from_fn(|p| {
                let p = p as i8;
                let l = |o: i8| o + p;
                _mm256_setr_epi8(
                    l(0),
                    l(0),
                    l(0),
                    l(0),
                    l(4),
                    l(4),
                    l(4),
                    l(4),
                    l(8),
                    l(8),
                    l(8),
                    l(8),
                    l(12),
                    l(12),
                    l(12),
                    l(12),
                    l(0),
                    l(0),
                    l(0),
                    l(0),
                    l(4),
                    l(4),
                    l(4),
                    l(4),
                    l(8),
                    l(8),
                    l(8),
                    l(8),
                    l(12),
                    l(12),
                    l(12),
                    l(12),
                )
            });
            let bits_lo = _mm256_set1_epi32(0x0804_0201);
            let bits_hi = _mm256_set1_epi32(0x8040_2010u32 as i32);
            let mut acc = [_mm256_setzero_ps(); R];
            let mut corr = [_mm256_setzero_ps(); R];
            for b in 0..nb {
                let p = w.add(b * gb);
                if R == 1 {
                    prefetch_ahead(p, gb);
                }
                let dw = _mm256_cvtph_ps(_mm_loadu_si128(p as *const __m128i));
                let q = p.add(qat);
                let mut wv = [_mm256_setzero_si256(); 8];
                if fmt == BlockFmt::Q8_0 {
                    for (j, v) in wv.iter_mut().enumerate() {
                        let raw = _mm256_loadu_si256(q.add(32 * j) as *const __m256i);
                        // VNNI: unsigned `w + 128`, offset removed below; AVX2: signed.
                        *v = if $vnni {
                            _mm256_xor_si256(raw, flip)
                        } else {
                            raw
                        };
                    }
                } else {
                    let qh = if has_qh(fmt) {
                        _mm256_loadu_si256(p.add(qh_at) as *const __m256i)
                    } else {
                        _mm256_setzero_si256()
                    };
                    for j in 0..4 {
                        let raw = _mm256_loadu_si256(q.add(32 * j) as *const __m256i);
                        wv[j] = _mm256_and_si256(raw, mask);
                        wv[j + 4] = _mm256_and_si256(_mm256_srli_epi16::<4>(raw), mask);
                        if has_qh(fmt) {
                            let h = _mm256_shuffle_epi8(qh, spread[j]);
                            let lo = _mm256_cmpeq_epi8(_mm256_and_si256(h, bits_lo), bits_lo);
                            let hi = _mm256_cmpeq_epi8(_mm256_and_si256(h, bits_hi), bits_hi);
                            wv[j] = _mm256_or_si256(wv[j], _mm256_and_si256(lo, sixteen));
                            wv[j + 4] = _mm256_or_si256(wv[j + 4], _mm256_and_si256(hi, sixteen));
                        }
                    }
                    if !$vnni && !fmt.has_min() {
                        let off = if has_qh(fmt) { sixteen } else { eight };
                        for v in wv.iter_mut() {
                            *v = _mm256_sub_epi8(*v, off);
                        }
                    }
                }
                // Activation pieces: elements 4t..4t+4 pair with wv[t] (Q4/Q5: the low
                // nibbles of pieces 0..4 are elements 0..16, the high ones 16..32).
                let mut isum = [[_mm256_setzero_si256(); R]; S];
                for (t, v) in wv.iter().enumerate() {
                    for r in 0..R {
                        let xq = (*x[r].add(b)).qs.as_ptr().add(4 * t) as *const i32;
                        let y = _mm256_set1_epi32(xq.read_unaligned());
                        let a = isum[t % S][r];
                        isum[t % S][r] = if $vnni {
                            _mm256_dpbusd_epi32(a, *v, y)
                        } else if fmt.has_min() {
                            _mm256_add_epi32(
                                a,
                                _mm256_madd_epi16(_mm256_maddubs_epi16(*v, y), ones),
                            )
                        } else {
                            let aw = _mm256_sign_epi8(*v, *v);
                            let sy = _mm256_sign_epi8(y, *v);
                            _mm256_add_epi32(
                                a,
                                _mm256_madd_epi16(_mm256_maddubs_epi16(aw, sy), ones),
                            )
                        };
                    }
                }
                for r in 0..R {
                    let xb = &*x[r].add(b);
                    let mut i = isum[0][r];
                    for set in isum.iter().skip(1) {
                        i = _mm256_add_epi32(i, set[r]);
                    }
                    if $vnni {
                        let off = match fmt {
                            BlockFmt::Q4_0 => 8,
                            BlockFmt::Q5_0 => 16,
                            BlockFmt::Q8_0 => 128,
                            _ => 0,
                        };
                        if off != 0 {
                            i = _mm256_sub_epi32(i, _mm256_set1_epi32(off * xb.sum));
                        }
                    }
                    acc[r] = _mm256_fmadd_ps(
                        _mm256_cvtepi32_ps(i),
                        _mm256_mul_ps(dw, _mm256_set1_ps(xb.d)),
                        acc[r],
                    );
                    if fmt.has_min() {
                        let mw = _mm256_cvtph_ps(_mm_loadu_si128(p.add(2 * G) as *const __m128i));
                        corr[r] = _mm256_fmadd_ps(mw, _mm256_set1_ps(xb.s), corr[r]);
                    }
                }
            }
            for r in 0..R {
                _mm256_storeu_ps(out[r].as_mut_ptr(), _mm256_add_ps(acc[r], corr[r]));
            }
        }
    };
}

#[cfg(target_arch = "x86_64")]
simd_group!(group_avx2, "avx2,fma,f16c", false);
#[cfg(target_arch = "x86_64")]
simd_group!(group_vnni, "avx2,fma,f16c,avx512vnni,avx512vl", true);

/// [`group_vnni`] on 512-bit vectors over groups of 16 rows: one 64-byte load holds the same
/// four elements of 16 rows, one `dpbusd` against a broadcast of four activation bytes sums
/// them for all 16 rows.
#[cfg(target_arch = "x86_64")]
/// # Safety
/// The CPU supports `avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c` (the caller checked at
/// run time). `w` starts a group of `nb` blocks of format `F` and every `x` a row of `nb` blocks.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
unsafe fn group_avx512<const F: u8, const R: usize, const S: usize>(
    w: *const u8,
    x: [*const XBlock; R],
    nb: usize,
    out: &mut [[f32; G16]; R],
) {
    use std::arch::x86_64::*;
    let fmt = const { fmt_of(F) };
    let gb = fmt.bytes() * G16;
    let qat = group_quants_at(fmt, G16);
    let qh_at = group_qh_at(fmt, G16);
    let mask = _mm512_set1_epi8(0x0F);
    let sixteen = _mm512_set1_epi8(16);
    let flip = _mm512_set1_epi8(-128);
    let spread: [__m512i; 4] = std::array::from_fn(|p| {
        let p = p as u32;
        // Within each 128-bit lane, bytes 4i..4i+4 take byte 4i + p.
        let word = |i: u32| ((4 * i + p) * 0x0101_0101) as i32;
        _mm512_broadcast_i32x4(_mm_setr_epi32(word(0), word(1), word(2), word(3)))
    });
    let bits_lo = _mm512_set1_epi32(0x0804_0201);
    let bits_hi = _mm512_set1_epi32(0x8040_2010u32 as i32);
    let mut acc = [_mm512_setzero_ps(); R];
    let mut corr = [_mm512_setzero_ps(); R];
    for b in 0..nb {
        let p = w.add(b * gb);
        if R == 1 {
            prefetch_ahead(p, gb);
        }
        let dw = _mm512_cvtph_ps(_mm256_loadu_si256(p as *const __m256i));
        let q = p.add(qat);
        let mut wv = [_mm512_setzero_si512(); 8];
        if fmt == BlockFmt::Q8_0 {
            for (j, v) in wv.iter_mut().enumerate() {
                *v = _mm512_xor_si512(_mm512_loadu_si512(q.add(64 * j) as *const _), flip);
            }
        } else {
            let qh = if has_qh(fmt) {
                _mm512_loadu_si512(p.add(qh_at) as *const _)
            } else {
                _mm512_setzero_si512()
            };
            for j in 0..4 {
                let raw = _mm512_loadu_si512(q.add(64 * j) as *const _);
                wv[j] = _mm512_and_si512(raw, mask);
                wv[j + 4] = _mm512_and_si512(_mm512_srli_epi16::<4>(raw), mask);
                if has_qh(fmt) {
                    let h = _mm512_shuffle_epi8(qh, spread[j]);
                    let lo = _mm512_test_epi8_mask(h, bits_lo);
                    let hi = _mm512_test_epi8_mask(h, bits_hi);
                    wv[j] = _mm512_mask_add_epi8(wv[j], lo, wv[j], sixteen);
                    wv[j + 4] = _mm512_mask_add_epi8(wv[j + 4], hi, wv[j + 4], sixteen);
                }
            }
        }
        let mut isum = [[_mm512_setzero_si512(); R]; S];
        for (t, v) in wv.iter().enumerate() {
            for r in 0..R {
                let xq = (*x[r].add(b)).qs.as_ptr().add(4 * t) as *const i32;
                let y = _mm512_set1_epi32(xq.read_unaligned());
                isum[t % S][r] = _mm512_dpbusd_epi32(isum[t % S][r], *v, y);
            }
        }
        for r in 0..R {
            let xb = &*x[r].add(b);
            let mut i = isum[0][r];
            for set in isum.iter().skip(1) {
                i = _mm512_add_epi32(i, set[r]);
            }
            let off = match fmt {
                BlockFmt::Q4_0 => 8,
                BlockFmt::Q5_0 => 16,
                BlockFmt::Q8_0 => 128,
                _ => 0,
            };
            if off != 0 {
                i = _mm512_sub_epi32(i, _mm512_set1_epi32(off * xb.sum));
            }
            acc[r] = _mm512_fmadd_ps(
                _mm512_cvtepi32_ps(i),
                _mm512_mul_ps(dw, _mm512_set1_ps(xb.d)),
                acc[r],
            );
            if fmt.has_min() {
                let mw = _mm512_cvtph_ps(_mm256_loadu_si256(p.add(2 * G16) as *const __m256i));
                corr[r] = _mm512_fmadd_ps(mw, _mm512_set1_ps(xb.s), corr[r]);
            }
        }
    }
    for r in 0..R {
        _mm512_storeu_ps(out[r].as_mut_ptr(), _mm512_add_ps(acc[r], corr[r]));
    }
}

/// [`group_avx512`] compiled for `fmt`.
///
/// # Safety
/// As [`group_kernel`], with AVX-512 F/BW/VL/VNNI.
#[cfg(target_arch = "x86_64")]
unsafe fn group_kernel16<const R: usize, const S: usize>(
    fmt: BlockFmt,
    w: *const u8,
    x: [*const XBlock; R],
    nb: usize,
    out: &mut [[f32; G16]; R],
) {
    // SAFETY: forwarded from the caller.
    unsafe {
        match fmt {
            BlockFmt::Q4_0 => group_avx512::<F_Q4_0, R, S>(w, x, nb, out),
            BlockFmt::Q4_1 => group_avx512::<F_Q4_1, R, S>(w, x, nb, out),
            BlockFmt::Q5_0 => group_avx512::<F_Q5_0, R, S>(w, x, nb, out),
            BlockFmt::Q5_1 => group_avx512::<F_Q5_1, R, S>(w, x, nb, out),
            BlockFmt::Q8_0 => group_avx512::<F_Q8_0, R, S>(w, x, nb, out),
        }
    }
}

/// One group tile through the kernel compiled for `fmt` and the ISA.
///
/// # Safety
/// The CPU has the ISA's features; `w` starts a group of `nb` blocks and every `x` a row of
/// `nb` blocks.
#[cfg(target_arch = "x86_64")]
unsafe fn group_kernel<const R: usize, const S: usize>(
    fmt: BlockFmt,
    vnni: bool,
    w: *const u8,
    x: [*const XBlock; R],
    nb: usize,
    out: &mut [[f32; G]; R],
) {
    macro_rules! go {
        ($f:expr) => {
            if vnni {
                group_vnni::<{ $f }, R, S>(w, x, nb, out)
            } else {
                group_avx2::<{ $f }, R, S>(w, x, nb, out)
            }
        };
    }
    // SAFETY: forwarded from the caller.
    unsafe {
        match fmt {
            BlockFmt::Q4_0 => go!(F_Q4_0),
            BlockFmt::Q4_1 => go!(F_Q4_1),
            BlockFmt::Q5_0 => go!(F_Q5_0),
            BlockFmt::Q5_1 => go!(F_Q5_1),
            BlockFmt::Q8_0 => go!(F_Q8_0),
        }
    }
}

/// Quantized activations of `m` rows of `k` values, rows spread over the pool.
fn quantize_rows_parallel(xs: &[f32], m: usize, k: usize) -> Vec<XBlock> {
    let nb = k / QK;
    let mut xq = vec![ZERO_X; m * nb];
    if nb > 0 {
        for_each_chunk_mut(&mut xq, nb, &|r, out| {
            quantize_row(&xs[r * k..(r + 1) * k], out)
        });
    }
    xq
}

/// A matmul input's values: borrowed from the tensor's storage when it is a contiguous f32
/// CPU tensor (no copy), else copied out.
pub(crate) enum Input<'a> {
    Borrowed(candle_core::StorageRef<'a>, usize, usize),
    Owned(Vec<f32>),
}

impl std::ops::Deref for Input<'_> {
    type Target = [f32];
    fn deref(&self) -> &[f32] {
        match self {
            Input::Borrowed(s, a, b) => match &**s {
                candle_core::Storage::Cpu(candle_core::CpuStorage::F32(v)) => &v[*a..*b],
                _ => &[],
            },
            Input::Owned(v) => v,
        }
    }
}

pub(crate) fn input_f32(x: &Tensor) -> Result<Input<'_>> {
    let (storage, layout) = x.storage_and_layout();
    if let (candle_core::Storage::Cpu(candle_core::CpuStorage::F32(_)), Some((a, b))) =
        (&*storage, layout.contiguous_offsets())
    {
        return Ok(Input::Borrowed(storage, a, b));
    }
    drop(storage);
    Ok(Input::Owned(x.flatten_all()?.to_vec1::<f32>()?))
}

/// SwiGLU, `silu(g) * u` with `silu(x) = x / (1 + exp(-x))`, of `[rows, width]` tensors into
/// a new tensor (through [`swiglu_rows`]).
#[cfg(test)]
pub(crate) fn swiglu(g: &Tensor, u: &Tensor) -> Result<Tensor> {
    let (rows, width) = g.dims2()?;
    if g.dims() != u.dims() || width == 0 {
        return Err(Error::InvalidArgument(format!(
            "swiglu: {:?} vs {:?}",
            g.dims(),
            u.dims()
        )));
    }
    let (g, u) = (input_f32(g)?, input_f32(u)?);
    let gu: Vec<f32> = g
        .chunks_exact(width)
        .zip(u.chunks_exact(width))
        .flat_map(|(a, b)| a.iter().chain(b).copied())
        .collect();
    let mut out = vec![0f32; rows * width];
    swiglu_rows(&gu, width, &mut out);
    Ok(Tensor::from_vec(out, (rows, width), &Device::Cpu)?)
}

/// RMS norm of each row of `x` (rows of `w.len()` values) into `out`: `x / sqrt(mean(x^2) +
/// eps) * w`, with candle's `rms_norm` arithmetic (a sequential f32 sum of squares, then a
/// divide and a multiply per value). Rows spread over the pool for prompts.
pub(crate) fn rms_norm_rows(x: &[f32], w: &[f32], eps: f32, out: &mut [f32]) {
    let d = w.len();
    assert!(
        d > 0 && x.len() == out.len() && x.len().is_multiple_of(d),
        "rms_norm shapes"
    );
    let norm = |src: &[f32], dst: &mut [f32]| {
        let sum2 = src.iter().map(|&v| v * v).sum::<f32>();
        let m = (sum2 / d as f32 + eps).sqrt();
        for ((o, &s), &a) in dst.iter_mut().zip(src).zip(w) {
            *o = s / m * a;
        }
    };
    rows_on_pool(x, out, d, &norm);
}

/// `x += y`, elementwise (the residual adds).
pub(crate) fn add_in_place(x: &mut [f32], y: &[f32]) {
    assert_eq!(x.len(), y.len(), "add shapes");
    chunks_on_pool(x, &|r, xc| {
        for (a, b) in xc.iter_mut().zip(&y[r]) {
            *a += b;
        }
    });
}

/// `f(range, &mut x[range])` over chunks of `x`, on the pool when there is more than one.
fn chunks_on_pool(x: &mut [f32], f: &(dyn Fn(std::ops::Range<usize>, &mut [f32]) + Sync)) {
    const CHUNK: usize = 4096;
    let n = x.len();
    if n <= CHUNK {
        f(0..n, x);
        return;
    }
    for_each_chunk_mut(x, CHUNK, &|c, xc| f(c * CHUNK..c * CHUNK + xc.len(), xc));
}

/// `f(src row, dst row)` for each row of `d` values, on the pool when there are many rows.
fn rows_on_pool(src: &[f32], dst: &mut [f32], d: usize, f: &(dyn Fn(&[f32], &mut [f32]) + Sync)) {
    let rows = src.len() / d;
    const ROWS: usize = 16;
    if rows <= ROWS {
        for (s, o) in src.chunks_exact(d).zip(dst.chunks_exact_mut(d)) {
            f(s, o);
        }
        return;
    }
    for_each_chunk_mut(&mut dst[..rows * d], ROWS * d, &|c, block| {
        for (j, o) in block.chunks_exact_mut(d).enumerate() {
            let r = c * ROWS + j;
            f(&src[r * d..(r + 1) * d], o);
        }
    });
}

/// SwiGLU of stacked gate/up rows: each row of `gu` holds `width` gate values then `width` up
/// values (the output of the stacked gate/up matrix), and row `i` of `out` (`width` values)
/// gets `silu(gate) * up`, in one pass on the pool (the vectorized `exp` of the attention
/// kernel).
pub(crate) fn swiglu_rows(gu: &[f32], width: usize, out: &mut [f32]) {
    assert!(
        width > 0 && gu.len() == 2 * out.len() && out.len().is_multiple_of(width),
        "swiglu operands"
    );
    let simd = simd();
    chunks_on_pool(out, &|r, o| {
        // The chunk may start and end inside rows: one piece per row it touches.
        let mut at = r.start;
        while at < r.end {
            let (row, col) = (at / width, at % width);
            let len = (width - col).min(r.end - at);
            let g = &gu[row * 2 * width + col..][..len];
            let u = &gu[row * 2 * width + width + col..][..len];
            silu_mul(g, u, &mut o[at - r.start..][..len], simd);
            at += len;
        }
    });
}

/// `o = silu(g) * u`, `silu(x) = x / (1 + exp(-x))`.
fn silu_mul(g: &[f32], u: &[f32], o: &mut [f32], simd: bool) {
    let mut i = 0;
    #[cfg(target_arch = "x86_64")]
    if simd {
        // SAFETY: avx2 and fma were detected at run time; every access is in bounds.
        unsafe {
            use std::arch::x86_64::*;
            let one = _mm256_set1_ps(1.0);
            while i + 8 <= o.len() {
                let gv = _mm256_loadu_ps(g.as_ptr().add(i));
                let e = crate::attention::exp8(_mm256_sub_ps(_mm256_setzero_ps(), gv));
                let silu = _mm256_div_ps(gv, _mm256_add_ps(e, one));
                let y = _mm256_mul_ps(silu, _mm256_loadu_ps(u.as_ptr().add(i)));
                _mm256_storeu_ps(o.as_mut_ptr().add(i), y);
                i += 8;
            }
        }
    }
    let _ = simd;
    for j in i..o.len() {
        o[j] = g[j] / (1.0 + (-g[j]).exp()) * u[j];
    }
}

fn matmul_shape(x: &Tensor, k_w: usize, n: usize) -> Result<(usize, usize, Vec<usize>)> {
    let mut dims = x.dims().to_vec();
    let k = *dims.last().unwrap_or(&0);
    if k != k_w || k == 0 {
        return Err(Error::InvalidArgument(format!(
            "matmul: input width {k} != {k_w}"
        )));
    }
    let m = x.elem_count() / k;
    *dims.last_mut().expect("non-empty") = n;
    Ok((m, k, dims))
}

pub(crate) fn check_ids(ids: &[u32], rows: usize) -> Result<()> {
    match ids.iter().find(|&&id| id as usize >= rows) {
        Some(id) => Err(Error::InvalidArgument(format!(
            "token id {id} is outside the embedding of {rows} rows"
        ))),
        None => Ok(()),
    }
}

/// `x @ W^T` as a new tensor through `matmul`, which writes every element of the `[m, n]`
/// output (the contract of every matrix type's `matmul`).
fn forward_via(
    x: &Tensor,
    k: usize,
    n: usize,
    matmul: impl FnOnce(&[f32], usize, DstWriter<'_>) -> Result<()>,
) -> Result<Tensor> {
    let (m, _, out_dims) = matmul_shape(x, k, n)?;
    let xs = input_f32(x)?;
    let mut dst = Dst::new(m, n);
    matmul(&xs, m, dst.writer())?;
    drop(xs);
    // SAFETY: `matmul` wrote every element.
    let dst = unsafe { dst.finish() };
    Ok(Tensor::from_vec(dst, out_dims, &Device::Cpu)?)
}

/// Runs `work` for items `0..items` on our thread pool (`crate::pool`).
fn run_items(items: usize, work: &(dyn Fn(usize) + Sync)) {
    crate::pool::pool().run(items, &|range| range.for_each(work));
}

/// A matmul's `[m, n]` output, filled by work items that each write their own values: no
/// zeroing pass over the buffer first (it would cost a memory pass per matmul).
pub(crate) struct Dst {
    buf: Vec<f32>,
    m: usize,
    n: usize,
}

/// Where work items write a matmul's `[m, n]` output (shared by the items of one matmul; it
/// borrows the buffer for as long as it lives).
#[derive(Clone, Copy)]
pub(crate) struct DstWriter<'a> {
    ptr: usize,
    m: usize,
    n: usize,
    /// Values from one row to the next (`n` unless the output is a column block of a wider
    /// buffer).
    stride: usize,
    _buf: std::marker::PhantomData<&'a mut [f32]>,
}

impl Dst {
    pub(crate) fn new(m: usize, n: usize) -> Dst {
        Dst {
            buf: Vec::with_capacity(m * n),
            m,
            n,
        }
    }

    pub(crate) fn writer(&mut self) -> DstWriter<'_> {
        DstWriter {
            ptr: self.buf.as_mut_ptr() as usize,
            m: self.m,
            n: self.n,
            stride: self.n,
            _buf: std::marker::PhantomData,
        }
    }

    /// The values.
    ///
    /// # Safety
    /// Every element was written through [`DstWriter::put`].
    pub(crate) unsafe fn finish(mut self) -> Vec<f32> {
        // SAFETY: the caller wrote all m * n elements of the reserved capacity.
        unsafe { self.buf.set_len(self.m * self.n) };
        self.buf
    }
}

impl<'a> DstWriter<'a> {
    /// A writer over columns `col0..col0 + n` of `out`, `[m, stride]` row-major.
    pub(crate) fn columns(
        out: &'a mut [f32],
        m: usize,
        stride: usize,
        col0: usize,
        n: usize,
    ) -> DstWriter<'a> {
        assert!(
            out.len() == m * stride && col0 + n <= stride,
            "matmul output size"
        );
        DstWriter {
            // In bounds: col0 <= stride, and the buffer holds m * stride values.
            ptr: out.as_mut_ptr().wrapping_add(col0) as usize,
            m,
            n,
            stride,
            _buf: std::marker::PhantomData,
        }
    }

    /// Writes `vals` at row `row`, columns `col..col + vals.len()`. Work items write disjoint
    /// places.
    #[inline]
    pub(crate) fn put(&self, row: usize, col: usize, vals: &[f32]) {
        assert!(
            row < self.m && col + vals.len() <= self.n,
            "matmul output bounds"
        );
        // SAFETY: in bounds (checked above) of a buffer with m rows of `stride` reserved values
        // that lives until `finish` (or the borrow ends); no two work items write the same
        // element.
        unsafe {
            std::ptr::copy_nonoverlapping(
                vals.as_ptr(),
                (self.ptr as *mut f32).add(row * self.stride + col),
                vals.len(),
            )
        };
    }
}

/// A weight matrix `[n, k]` (rows are output features) in one of the block formats, stored as
/// GGUF blocks, or as interleaved groups of 8 rows (see [`G`]).
#[derive(Debug)]
pub(crate) struct BlockMatrix {
    fmt: BlockFmt,
    n: usize,
    k: usize,
    /// Rows per interleaved group: 16 (512-bit kernels), 8, or 0 for GGUF rows.
    group: usize,
    data: Vec<u8>,
}

/// Activation rows per tile in prompt processing, and weight rows per tile.
const TILE_R: usize = 4;
const TILE_C: usize = 2;
/// Weight rows per work item in decode.
const DECODE_C: usize = 4;
/// Activation rows per tile over interleaved groups: 8 with the 512-bit kernels (16-row
/// groups), 6 with the 256-bit ones.
const GROUP_R: usize = 8;
const GROUP_R8: usize = 6;

impl BlockMatrix {
    /// Copies the GGUF bytes of a `[n, k]` tensor (interleaved when the format allows).
    pub(crate) fn new(fmt: BlockFmt, data: &[u8], n: usize, k: usize) -> Result<Self> {
        Self::new_releasing(fmt, data, n, k, &|_, _| {})
    }

    /// [`BlockMatrix::new`] calling `release(start, len)` for each range of `data` once it has
    /// been copied (about every MiB), so that a memory-mapped source need not stay resident.
    pub(crate) fn new_releasing(
        fmt: BlockFmt,
        data: &[u8],
        n: usize,
        k: usize,
        release: &dyn Fn(usize, usize),
    ) -> Result<Self> {
        if !k.is_multiple_of(QK) || data.len() != n * (k / QK) * fmt.bytes() {
            return Err(Error::InvalidArgument(format!(
                "{fmt:?} matrix [{n}, {k}] cannot hold {} bytes",
                data.len()
            )));
        }
        let group = if !repack() {
            0
        } else if isa() == Isa::Avx512 && n.is_multiple_of(G16) {
            G16
        } else if n.is_multiple_of(G) {
            G
        } else {
            0
        };
        let data = if group > 0 {
            interleave(fmt, data, k, group, release)
        } else {
            let mut out = Vec::with_capacity(data.len());
            for (i, c) in data.chunks(RELEASE_CHUNK).enumerate() {
                out.extend_from_slice(c);
                release(i * RELEASE_CHUNK, c.len());
            }
            out
        };
        Ok(BlockMatrix {
            fmt,
            n,
            k,
            group,
            data,
        })
    }

    /// The GGUF bytes of block `b` of row `c` (whatever the layout).
    fn block(&self, c: usize, b: usize) -> [u8; 34] {
        let (bytes, nb, gs) = (self.fmt.bytes(), self.k / QK, self.group);
        let mut out = [0u8; 34];
        if gs == 0 {
            out[..bytes].copy_from_slice(&self.data[(c * nb + b) * bytes..][..bytes]);
            return out;
        }
        let (g, i) = (c / gs, c % gs);
        let gb = &self.data[(g * nb + b) * gs * bytes..][..gs * bytes];
        let (qh_at, qat, head) = (
            group_qh_at(self.fmt, gs),
            group_quants_at(self.fmt, gs),
            head_bytes(self.fmt),
        );
        out[..2].copy_from_slice(&gb[2 * i..2 * i + 2]);
        if self.fmt.has_min() {
            out[2..4].copy_from_slice(&gb[2 * gs + 2 * i..2 * gs + 2 * i + 2]);
        }
        if has_qh(self.fmt) {
            let w = &gb[qh_at + 4 * i..qh_at + 4 * i + 4];
            let qh = qh_from_pieces(u32::from_le_bytes([w[0], w[1], w[2], w[3]]));
            out[head - 4..head].copy_from_slice(&qh.to_le_bytes());
        }
        for j in 0..(bytes - head) / 4 {
            let at = qat + (j * gs + i) * 4;
            out[head + 4 * j..head + 4 * j + 4].copy_from_slice(&gb[at..at + 4]);
        }
        out
    }

    /// Row `c` as GGUF blocks.
    #[cfg(test)]
    fn gguf_row(&self, c: usize) -> Vec<u8> {
        (0..self.k / QK)
            .flat_map(|b| self.block(c, b)[..self.fmt.bytes()].to_vec())
            .collect()
    }

    /// The matrices' rows one after another, as one matrix, when they share a format, a width
    /// and a layout (groups are stored one after another, so the bytes simply follow).
    pub(crate) fn stack(parts: &[&BlockMatrix]) -> Option<BlockMatrix> {
        let first = parts.first()?;
        if parts
            .iter()
            .any(|p| p.fmt != first.fmt || p.k != first.k || p.group != first.group)
        {
            return None;
        }
        let mut data = Vec::with_capacity(parts.iter().map(|p| p.data.len()).sum());
        for p in parts {
            data.extend_from_slice(&p.data);
        }
        Some(BlockMatrix {
            fmt: first.fmt,
            n: parts.iter().map(|p| p.n).sum(),
            k: first.k,
            group: first.group,
            data,
        })
    }

    fn row(&self, j: usize) -> &[u8] {
        let rb = self.k / QK * self.fmt.bytes();
        &self.data[j * rb..(j + 1) * rb]
    }

    /// Dots of activation rows `rows` with weight rows `cols` (at most R x C), into `out`.
    fn tile<const R: usize, const C: usize>(
        &self,
        isa: Isa,
        xq: &[XBlock],
        rows: std::ops::Range<usize>,
        cols: std::ops::Range<usize>,
        out: &mut [[f32; C]; R],
    ) {
        let nb = self.k / QK;
        let full = rows.len() == R && cols.len() == C;
        match isa {
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 | Isa::Vnni | Isa::Avx512 if full => {
                let w: [*const u8; C] = std::array::from_fn(|c| self.row(cols.start + c).as_ptr());
                let x: [*const XBlock; R] =
                    std::array::from_fn(|r| xq[(rows.start + r) * nb..].as_ptr());
                // SAFETY: the CPU has the features (checked at run time); every pointer starts
                // a row of `nb` blocks inside its buffer.
                unsafe {
                    if isa.vnni() {
                        tile_vnni::<R, C>(self.fmt, w, x, nb, out)
                    } else {
                        tile_avx2::<R, C>(self.fmt, w, x, nb, out)
                    }
                }
            }
            _ => {
                for (r, row) in rows.clone().enumerate() {
                    for (c, col) in cols.clone().enumerate() {
                        out[r][c] =
                            dot_scalar(self.fmt, self.row(col), &xq[row * nb..(row + 1) * nb]);
                    }
                }
            }
        }
    }

    /// Row `id` dequantized into `dst` (`k` values).
    fn dequantize_row(&self, id: usize, dst: &mut [f32]) {
        for (b, o) in dst.chunks_exact_mut(QK).enumerate() {
            let wb = self.block(id, b);
            let d = f16_at(&wb, 0);
            let m = if self.fmt.has_min() {
                f16_at(&wb, 2)
            } else {
                0.0
            };
            let (u, off) = self.fmt.unsigned_quants(&wb);
            for (o, &q) in o.iter_mut().zip(&u) {
                *o = (q as i32 - off) as f32 * d + m;
            }
        }
    }

    /// Dots of activation rows `rows` (at most [`GROUP_R`] for 16-row groups, [`GROUP_R8`]
    /// for 8-row groups) with the rows of group `g`.
    fn group_tile(
        &self,
        isa: Isa,
        xq: &[XBlock],
        rows: std::ops::Range<usize>,
        g: usize,
        out: &mut [[f32; G16]; GROUP_R],
    ) {
        let (nb, gs) = (self.k / QK, self.group);
        let gbytes = nb * gs * self.fmt.bytes();
        match isa {
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 | Isa::Vnni | Isa::Avx512 => {
                let w = self.data[g * gbytes..(g + 1) * gbytes].as_ptr();
                // A partial tile repeats its last row; the extra results are not used.
                let x: [*const XBlock; GROUP_R] = std::array::from_fn(|r| {
                    let row = (rows.start + r).min(rows.end - 1);
                    xq[row * nb..(row + 1) * nb].as_ptr()
                });
                // SAFETY: the CPU has the features (checked at run time: a 16-row layout is
                // chosen only with AVX-512); `w` starts a group of `nb` blocks and every `x` a
                // row of `nb` blocks inside their buffers.
                unsafe {
                    if gs == G16 {
                        if rows.len() == 1 {
                            let mut one = [[0f32; G16]; 1];
                            group_kernel16::<1, 2>(self.fmt, w, [x[0]], nb, &mut one);
                            out[0] = one[0];
                        } else {
                            group_kernel16::<GROUP_R, 2>(self.fmt, w, x, nb, out);
                        }
                        return;
                    }
                    let vnni = isa.vnni();
                    if rows.len() == 1 {
                        let mut one = [[0f32; G]; 1];
                        group_kernel::<1, 2>(self.fmt, vnni, w, [x[0]], nb, &mut one);
                        out[0][..G].copy_from_slice(&one[0]);
                    } else {
                        let mut part = [[0f32; G]; GROUP_R8];
                        let x = std::array::from_fn(|r| x[r]);
                        group_kernel::<GROUP_R8, 2>(self.fmt, vnni, w, x, nb, &mut part);
                        for (o, p) in out.iter_mut().zip(&part) {
                            o[..G].copy_from_slice(p);
                        }
                    }
                }
            }
            _ => {
                for (r, row) in rows.enumerate() {
                    let xr = &xq[row * nb..(row + 1) * nb];
                    for (i, o) in out[r][..gs].iter_mut().enumerate() {
                        *o = (0..nb)
                            .map(|b| {
                                dot_scalar(self.fmt, &self.block(g * gs + i, b), &xr[b..b + 1])
                            })
                            .sum();
                    }
                }
            }
        }
    }

    /// `xs @ W^T` for `m` rows of `k` values, every output written through `put`.
    fn compute(&self, xs: &[f32], m: usize, put: DstWriter<'_>) {
        let (n, k) = (self.n, self.k);
        let xq = quantize_rows_parallel(xs, m, k);
        let isa = isa();
        let items;
        let work: Box<dyn Fn(usize) + Sync> = if self.group > 0 {
            // Tiles of GROUP_R activation rows x one group, group-major so that a worker's
            // consecutive items reuse the group's weights from cache.
            let gs = self.group;
            let tile = if gs == G16 { GROUP_R } else { GROUP_R8 };
            let row_tiles = m.div_ceil(tile);
            items = row_tiles * (n / gs);
            Box::new(move |item: usize| {
                let (g, rt) = (item / row_tiles, item % row_tiles);
                let rows = rt * tile..m.min((rt + 1) * tile);
                let mut out = [[0f32; G16]; GROUP_R];
                self.group_tile(isa, &xq, rows.clone(), g, &mut out);
                for (r, row) in rows.enumerate() {
                    put.put(row, g * gs, &out[r][..gs]);
                }
            })
        } else if m == 1 {
            // Decode: one activation row, groups of weight rows.
            items = n.div_ceil(DECODE_C);
            Box::new(|g: usize| {
                let cols = g * DECODE_C..n.min((g + 1) * DECODE_C);
                let mut out = [[0f32; DECODE_C]; 1];
                self.tile::<1, DECODE_C>(isa, &xq, 0..1, cols.clone(), &mut out);
                put.put(0, cols.start, &out[0][..cols.len()]);
            })
        } else {
            // Prompt: tiles of TILE_R activation rows x TILE_C weight rows, weight-row major so
            // that a worker's consecutive items reuse the same weight rows from cache.
            let row_tiles = m.div_ceil(TILE_R);
            items = row_tiles * n.div_ceil(TILE_C);
            Box::new(move |item: usize| {
                let (cg, rt) = (item / row_tiles, item % row_tiles);
                let rows = rt * TILE_R..m.min((rt + 1) * TILE_R);
                let cols = cg * TILE_C..n.min((cg + 1) * TILE_C);
                let mut out = [[0f32; TILE_C]; TILE_R];
                self.tile::<TILE_R, TILE_C>(isa, &xq, rows.clone(), cols.clone(), &mut out);
                for (r, row) in rows.enumerate() {
                    put.put(row, cols.start, &out[r][..cols.len()]);
                }
            })
        };
        run_items(items, &work);
    }
}

/// A dense f16 weight matrix `[n, k]`, kept at f16 (half the bytes of f32) and multiplied in
/// f32 (F16C conversion and FMA on x86-64 when present).
///
/// When `n` is a multiple of 16 the rows are stored in interleaved groups of 16: for each
/// position `i` of `k`, the 16 rows' values side by side. A tile of activation rows and one
/// group is then a register-blocked GEMM: per position, the group's 16 values (one 512-bit or
/// two 256-bit vectors) and one broadcast activation per row. Prompts on AVX-512 convert pairs
/// of groups to f32 once per thread (`forward_pairs`). Other shapes keep plain rows and a dot
/// product per row.
#[derive(Debug)]
pub(crate) struct F16Matrix {
    n: usize,
    k: usize,
    grouped: bool,
    data: Vec<f16>,
}

/// Rows per f16 group, and activation rows per f16 tile.
const FG: usize = 16;
const F16_R: usize = 12;

#[cfg(target_arch = "x86_64")]
/// # Safety
/// The CPU supports `avx2,fma,f16c` (the caller checked at run time). `w` holds at least
/// `x.len()` values.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn dot_f16_avx2(w: &[f16], x: &[f32]) -> f32 {
    use std::arch::x86_64::*;
    let k = x.len();
    let mut acc = [_mm256_setzero_ps(); 4];
    let mut i = 0;
    while i + 32 <= k {
        for (j, a) in acc.iter_mut().enumerate() {
            let wv = _mm256_cvtph_ps(_mm_loadu_si128(w.as_ptr().add(i + 8 * j) as *const __m128i));
            let xv = _mm256_loadu_ps(x.as_ptr().add(i + 8 * j));
            *a = _mm256_fmadd_ps(wv, xv, *a);
        }
        i += 32;
    }
    while i + 8 <= k {
        let wv = _mm256_cvtph_ps(_mm_loadu_si128(w.as_ptr().add(i) as *const __m128i));
        acc[0] = _mm256_fmadd_ps(wv, _mm256_loadu_ps(x.as_ptr().add(i)), acc[0]);
        i += 8;
    }
    let v = _mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3]));
    let s4 = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
    let s2 = _mm_add_ps(s4, _mm_movehl_ps(s4, s4));
    let mut sum = _mm_cvtss_f32(_mm_add_ss(s2, _mm_shuffle_ps::<1>(s2, s2)));
    while i < k {
        sum += w[i].to_f32() * x[i];
        i += 1;
    }
    sum
}

fn dot_f16_scalar(w: &[f16], x: &[f32]) -> f32 {
    w.iter().zip(x).map(|(a, b)| a.to_f32() * b).sum()
}

/// `R` activation rows times one 16-row group (`w`: `k` positions of 16 values).
#[cfg(target_arch = "x86_64")]
/// # Safety
/// The CPU supports `avx2,fma,f16c` (the caller checked at run time). `w` holds `k` positions of
/// 16 values and every `x` a row of `k` values.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn f16_group_avx2<const R: usize>(
    w: *const f16,
    x: [*const f32; R],
    k: usize,
    out: &mut [[f32; FG]; R],
) {
    use std::arch::x86_64::*;
    // One row has two dependent FMA chains per position: split positions over four sets of
    // accumulators so the chains overlap. Several rows overlap by themselves.
    const U: usize = 4;
    let sets = if R == 1 { U } else { 1 };
    let mut acc = [[[_mm256_setzero_ps(); 2]; R]; U];
    let mut i = 0;
    while i + sets <= k {
        if R == 1 {
            prefetch_ahead(w.add(i * FG) as *const u8, sets * FG * 2);
        }
        for (u, a) in acc.iter_mut().enumerate().take(sets) {
            let p = w.add((i + u) * FG);
            let w0 = _mm256_cvtph_ps(_mm_loadu_si128(p as *const __m128i));
            let w1 = _mm256_cvtph_ps(_mm_loadu_si128(p.add(8) as *const __m128i));
            for r in 0..R {
                let xv = _mm256_set1_ps(*x[r].add(i + u));
                a[r][0] = _mm256_fmadd_ps(xv, w0, a[r][0]);
                a[r][1] = _mm256_fmadd_ps(xv, w1, a[r][1]);
            }
        }
        i += sets;
    }
    while i < k {
        let p = w.add(i * FG);
        let w0 = _mm256_cvtph_ps(_mm_loadu_si128(p as *const __m128i));
        let w1 = _mm256_cvtph_ps(_mm_loadu_si128(p.add(8) as *const __m128i));
        for r in 0..R {
            let xv = _mm256_set1_ps(*x[r].add(i));
            acc[0][r][0] = _mm256_fmadd_ps(xv, w0, acc[0][r][0]);
            acc[0][r][1] = _mm256_fmadd_ps(xv, w1, acc[0][r][1]);
        }
        i += 1;
    }
    for r in 0..R {
        let mut lo = acc[0][r][0];
        let mut hi = acc[0][r][1];
        for a in acc.iter().take(sets).skip(1) {
            lo = _mm256_add_ps(lo, a[r][0]);
            hi = _mm256_add_ps(hi, a[r][1]);
        }
        _mm256_storeu_ps(out[r].as_mut_ptr(), lo);
        _mm256_storeu_ps(out[r].as_mut_ptr().add(8), hi);
    }
}

/// [`f16_group_avx2`] on 512-bit vectors: one vector holds a position of all 16 rows of the
/// group, so a tile of `R` activation rows needs `R` accumulators. Per output lane the same
/// FMAs in the same order (and for one row the same four position sets), so both give
/// identical results.
#[cfg(target_arch = "x86_64")]
/// # Safety
/// The CPU supports `avx512f,avx2,fma,f16c` (the caller checked at run time). `w` holds `k`
/// positions of 16 values and every `x` a row of `k` values.
#[target_feature(enable = "avx512f,avx2,fma,f16c")]
unsafe fn f16_group_avx512<const R: usize>(
    w: *const f16,
    x: [*const f32; R],
    k: usize,
    out: &mut [[f32; FG]; R],
) {
    use std::arch::x86_64::*;
    const U: usize = 4;
    let sets = if R == 1 { U } else { 1 };
    let mut acc = [[_mm512_setzero_ps(); R]; U];
    let mut i = 0;
    while i + sets <= k {
        if R == 1 {
            prefetch_ahead(w.add(i * FG) as *const u8, sets * FG * 2);
        }
        for (u, a) in acc.iter_mut().enumerate().take(sets) {
            let wv = _mm512_cvtph_ps(_mm256_loadu_si256(w.add((i + u) * FG) as *const __m256i));
            for r in 0..R {
                a[r] = _mm512_fmadd_ps(_mm512_set1_ps(*x[r].add(i + u)), wv, a[r]);
            }
        }
        i += sets;
    }
    while i < k {
        let wv = _mm512_cvtph_ps(_mm256_loadu_si256(w.add(i * FG) as *const __m256i));
        for r in 0..R {
            acc[0][r] = _mm512_fmadd_ps(_mm512_set1_ps(*x[r].add(i)), wv, acc[0][r]);
        }
        i += 1;
    }
    for r in 0..R {
        let mut v = acc[0][r];
        for a in acc.iter().take(sets).skip(1) {
            v = _mm512_add_ps(v, a[r]);
        }
        _mm512_storeu_ps(out[r].as_mut_ptr(), v);
    }
}

/// `len` (a multiple of 16) f16 values from `src` as f32 into `dst`.
#[cfg(target_arch = "x86_64")]
/// # Safety
/// The CPU supports `avx512f,f16c` (the caller checked at run time). `src` is readable and `dst`
/// writable for `len` values.
#[target_feature(enable = "avx512f,f16c")]
unsafe fn f16_to_f32_avx512(src: *const f16, dst: *mut f32, len: usize) {
    use std::arch::x86_64::*;
    for i in (0..len).step_by(FG) {
        _mm512_storeu_ps(
            dst.add(i),
            _mm512_cvtph_ps(_mm256_loadu_si256(src.add(i) as *const __m256i)),
        );
    }
}

/// Two adjacent 16-row groups of f32 weights (`w` and `w + 16 k`, converted from f16 once
/// per tile of rows) times `R` activation rows. Per output lane the same FMAs in the same order
/// as the f16 tiles, so the same results.
#[cfg(target_arch = "x86_64")]
/// # Safety
/// The CPU supports `avx512f,fma` (the caller checked at run time). the pointers hold the
/// positions of the two groups and every activation row the caller passes.
#[target_feature(enable = "avx512f,fma")]
unsafe fn f32_group2_avx512<const R: usize>(
    w: *const f32,
    x: [*const f32; R],
    k: usize,
    out: &mut [[f32; 2 * FG]; R],
) {
    use std::arch::x86_64::*;
    let w1 = w.add(FG * k);
    let mut a0 = [_mm512_setzero_ps(); R];
    let mut a1 = [_mm512_setzero_ps(); R];
    for i in 0..k {
        let v0 = _mm512_loadu_ps(w.add(i * FG));
        let v1 = _mm512_loadu_ps(w1.add(i * FG));
        for r in 0..R {
            let xv = _mm512_set1_ps(*x[r].add(i));
            a0[r] = _mm512_fmadd_ps(xv, v0, a0[r]);
            a1[r] = _mm512_fmadd_ps(xv, v1, a1[r]);
        }
    }
    for r in 0..R {
        _mm512_storeu_ps(out[r].as_mut_ptr(), a0[r]);
        _mm512_storeu_ps(out[r].as_mut_ptr().add(FG), a1[r]);
    }
}

thread_local! {
    /// Per-thread f32 copy of the weight groups a prompt tile works on.
    static F32_SCRATCH: std::cell::RefCell<((usize, usize), Vec<f32>)> = const { std::cell::RefCell::new(((0, 0), Vec::new())) };
}

impl F16Matrix {
    /// Takes `n` rows of `k` values.
    #[cfg(test)]
    pub(crate) fn from_rows(data: Vec<f16>, n: usize, k: usize) -> Self {
        Self::from_pieces(vec![data], n, k)
    }

    /// Takes `n` rows of `k` values held in pieces of whole rows, one after another (a stacked
    /// matrix's parts), and joins and groups them in one pass, groups spread over the pool.
    pub(crate) fn from_pieces(mut pieces: Vec<Vec<f16>>, n: usize, k: usize) -> Self {
        let total: usize = pieces.iter().map(|p| p.len()).sum();
        assert!(
            total == n * k && pieces.iter().all(|p| p.len().is_multiple_of(k.max(1))),
            "f16 matrix [{n}, {k}]"
        );
        if !n.is_multiple_of(FG) || !repack() {
            let data = if pieces.len() == 1 {
                pieces.pop().unwrap_or_default()
            } else {
                pieces.concat()
            };
            return F16Matrix {
                n,
                k,
                grouped: false,
                data,
            };
        }
        // Where each row starts: (piece, offset).
        let mut rows = Vec::with_capacity(n);
        for (pi, p) in pieces.iter().enumerate() {
            rows.extend((0..p.len() / k).map(|r| (pi, r * k)));
        }
        let mut data: Vec<f16> = vec![f16::ZERO; n * k];
        // Group g holds its 16 rows position by position: value p of row i at p * 16 + i.
        if k > 0 {
            for_each_chunk_mut(&mut data, FG * k, &|g, out| {
                for i in 0..FG {
                    let (pi, at) = rows[g * FG + i];
                    for (p, &v) in pieces[pi][at..at + k].iter().enumerate() {
                        out[p * FG + i] = v;
                    }
                }
            });
        }
        F16Matrix {
            n,
            k,
            grouped: true,
            data,
        }
    }

    fn at(&self, c: usize, p: usize) -> f16 {
        if self.grouped {
            self.data[(c / FG * self.k + p) * FG + c % FG]
        } else {
            self.data[c * self.k + p]
        }
    }

    /// Row `id` as f32 into `dst` (`k` values).
    fn dequantize_row(&self, id: usize, dst: &mut [f32]) {
        for (p, o) in dst.iter_mut().enumerate() {
            *o = self.at(id, p).to_f32();
        }
    }

    /// Rows `rows` of `xs` times group `g`, into `out`.
    fn group_tile(
        &self,
        simd: bool,
        xs: &[f32],
        rows: std::ops::Range<usize>,
        g: usize,
        out: &mut [[f32; FG]; F16_R],
    ) {
        let k = self.k;
        let w = &self.data[g * FG * k..(g + 1) * FG * k];
        #[cfg(target_arch = "x86_64")]
        if simd {
            // A partial tile repeats its last row; the extra results are not used.
            let x: [*const f32; F16_R] = std::array::from_fn(|r| {
                let row = (rows.start + r).min(rows.end - 1);
                xs[row * k..(row + 1) * k].as_ptr()
            });
            let w = w.as_ptr();
            let wide = isa() == Isa::Avx512;
            // SAFETY: the features were detected at run time; `w` holds `k` positions of 16
            // values and every `x` a row of `k` values.
            unsafe {
                fn part<'a, const R: usize>(
                    x: &[*const f32],
                    out: &'a mut [[f32; FG]],
                ) -> ([*const f32; R], &'a mut [[f32; FG]; R]) {
                    (
                        std::array::from_fn(|r| x[r]),
                        (&mut out[..R]).try_into().expect("R rows"),
                    )
                }
                match (wide, rows.len()) {
                    (_, 1) => {
                        let (x, o) = part::<1>(&x, out);
                        if wide {
                            f16_group_avx512::<1>(w, x, k, o)
                        } else {
                            f16_group_avx2::<1>(w, x, k, o)
                        }
                    }
                    (true, 2..=4) => {
                        let (x, o) = part::<4>(&x, out);
                        f16_group_avx512::<4>(w, x, k, o)
                    }
                    (true, 5..=8) => {
                        let (x, o) = part::<8>(&x, out);
                        f16_group_avx512::<8>(w, x, k, o)
                    }
                    (true, _) => f16_group_avx512::<F16_R>(w, x, k, out),
                    (false, n) => {
                        for half in 0..n.div_ceil(F16_R / 2) {
                            let at = half * (F16_R / 2);
                            let (x, o) = part::<{ F16_R / 2 }>(&x[at..], &mut out[at..]);
                            f16_group_avx2::<{ F16_R / 2 }>(w, x, k, o)
                        }
                    }
                }
            }
            return;
        }
        let _ = simd;
        for (r, row) in rows.enumerate() {
            let xr = &xs[row * k..(row + 1) * k];
            for (i, o) in out[r].iter_mut().enumerate() {
                *o = xr
                    .iter()
                    .enumerate()
                    .map(|(p, v)| w[p * FG + i].to_f32() * v)
                    .sum();
            }
        }
    }

    /// `xs @ W^T` for `m` rows of `k` values, every output written through `put`.
    fn compute(&self, xs: &[f32], m: usize, put: DstWriter<'_>) {
        let n = self.n;
        let simd = isa() != Isa::Scalar;
        // Prompts on AVX-512 over pairs of groups.
        #[cfg(target_arch = "x86_64")]
        let done = self.grouped && m > 1 && n.is_multiple_of(2 * FG) && isa() == Isa::Avx512 && {
            self.forward_pairs(xs, m, put);
            true
        };
        #[cfg(not(target_arch = "x86_64"))]
        let done = false;
        if done {
        } else if self.grouped {
            let row_tiles = m.div_ceil(F16_R);
            let work = |item: usize| {
                let (g, rt) = (item / row_tiles, item % row_tiles);
                let rows = rt * F16_R..m.min((rt + 1) * F16_R);
                let mut out = [[0f32; FG]; F16_R];
                self.group_tile(simd, xs, rows.clone(), g, &mut out);
                for (r, row) in rows.enumerate() {
                    put.put(row, g * FG, &out[r]);
                }
            };
            run_items(row_tiles * (n / FG), &work);
        } else {
            self.forward_rows(xs, m, simd, put);
        }
    }

    /// Plain rows (a row count that is not a multiple of 16): a dot product per output.
    fn forward_rows(&self, xs: &[f32], m: usize, simd: bool, put: DstWriter<'_>) {
        let (n, k) = (self.n, self.k);
        let group = 8;
        let work = |g: usize| {
            for c in g * group..n.min((g + 1) * group) {
                let w = &self.data[c * k..(c + 1) * k];
                for r in 0..m {
                    let xr = &xs[r * k..(r + 1) * k];
                    #[cfg(target_arch = "x86_64")]
                    // SAFETY: avx2/fma/f16c were detected at run time when `simd` is set.
                    let v = if simd {
                        unsafe { dot_f16_avx2(w, xr) }
                    } else {
                        dot_f16_scalar(w, xr)
                    };
                    #[cfg(not(target_arch = "x86_64"))]
                    let v = dot_f16_scalar(w, xr);
                    put.put(r, c, &[v]);
                }
            }
        };
        run_items(n.div_ceil(group), &work);
    }

    /// Prompts on AVX-512, `n` a multiple of 32: each work item takes a pair of groups and a
    /// run of row tiles; the pair is converted to f32 once into a per-thread buffer (kept while
    /// the thread's next items use the same pair), so the inner loop is loads and FMAs only.
    #[cfg(target_arch = "x86_64")]
    fn forward_pairs(&self, xs: &[f32], m: usize, put: DstWriter<'_>) {
        use std::sync::atomic::{AtomicUsize, Ordering};
        /// Activation rows per tile, and tiles per work item.
        const R: usize = 12;
        const TILES: usize = 4;
        static CALLS: AtomicUsize = AtomicUsize::new(1);
        let (n, k) = (self.n, self.k);
        let row_tiles = m.div_ceil(R);
        let runs = row_tiles.div_ceil(TILES);
        // Tells this call's conversions from any earlier call's.
        let call = CALLS.fetch_add(1, Ordering::Relaxed);
        let work = |item: usize| {
            let (g2, run) = (item / runs, item % runs);
            let w = &self.data[2 * g2 * FG * k..(2 * g2 + 2) * FG * k];
            F32_SCRATCH.with(|cell| {
                let (key, buf) = &mut *cell.borrow_mut();
                if buf.len() < w.len() {
                    buf.resize(w.len(), 0.0);
                }
                if *key != (call, g2) {
                    // SAFETY: AVX-512 was detected at run time (the caller checked);
                    // `buf` holds at least `w.len()` values, a multiple of 16.
                    unsafe { f16_to_f32_avx512(w.as_ptr(), buf.as_mut_ptr(), w.len()) };
                    *key = (call, g2);
                }
                for rt in run * TILES..row_tiles.min((run + 1) * TILES) {
                    let rows = rt * R..m.min((rt + 1) * R);
                    // A partial tile repeats its last row; the extra results are not used.
                    let x: [*const f32; R] = std::array::from_fn(|r| {
                        let row = (rows.start + r).min(rows.end - 1);
                        xs[row * k..(row + 1) * k].as_ptr()
                    });
                    let mut out = [[0f32; 2 * FG]; R];
                    // SAFETY: as above; `buf` holds two groups of `k` positions and every
                    // `x` a row of `k` values.
                    unsafe { f32_group2_avx512::<R>(buf.as_ptr(), x, k, &mut out) };
                    for (r, row) in rows.enumerate() {
                        put.put(row, 2 * g2 * FG, &out[r]);
                    }
                }
            });
        };
        run_items(runs * (n / (2 * FG)), &work);
    }
}

impl WeightMatrix for BlockMatrix {
    fn dtype(&self) -> GgmlDType {
        self.fmt.ggml()
    }
    fn shape(&self) -> (usize, usize) {
        (self.n, self.k)
    }
    fn bytes(&self) -> usize {
        self.data.len()
    }
    fn matmul(&self, xs: &[f32], m: usize, put: DstWriter<'_>) -> Result<()> {
        self.compute(xs, m, put);
        Ok(())
    }
    fn row_into(&self, i: usize, out: &mut [f32]) -> Result<()> {
        self.dequantize_row(i, out);
        Ok(())
    }
}

impl WeightMatrix for F16Matrix {
    fn dtype(&self) -> GgmlDType {
        GgmlDType::F16
    }
    fn shape(&self) -> (usize, usize) {
        (self.n, self.k)
    }
    fn bytes(&self) -> usize {
        self.data.len() * 2
    }
    fn matmul(&self, xs: &[f32], m: usize, put: DstWriter<'_>) -> Result<()> {
        self.compute(xs, m, put);
        Ok(())
    }
    fn row_into(&self, i: usize, out: &mut [f32]) -> Result<()> {
        self.dequantize_row(i, out);
        Ok(())
    }
}

/// A k-quant weight matrix `[n, k]` (Q2_K to Q6_K) on our thread pool, with candle's block
/// dot products (`GgmlType::vec_dot`, AVX2 when the CPU has it) and activations quantized to
/// q8_K blocks as candle and ggml do. Running them on our pool rather than candle's keeps one
/// set of threads busy: with two pools, each one's idle workers spin while the other works.
pub(crate) struct KMatrix<T> {
    n: usize,
    k: usize,
    data: Vec<T>,
}

impl<T> std::fmt::Debug for KMatrix<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KMatrix")
            .field("n", &self.n)
            .field("k", &self.k)
            .finish()
    }
}

/// A weight matrix `[n, k]` (`n` outputs of `k` inputs), whatever its storage: the block
/// formats, f16, the k-quants, candle's tensors (`crate::matrix`). The model holds these; a
/// LoRA adapter wraps one.
pub(crate) trait WeightMatrix: Send + Sync {
    /// The storage type.
    fn dtype(&self) -> GgmlDType;
    /// `[n, k]`.
    fn shape(&self) -> (usize, usize);
    /// Bytes the weights occupy in memory.
    fn bytes(&self) -> usize;
    /// `xs @ W^T` for `m` rows of `k` values, every output written through `put`.
    fn matmul(&self, xs: &[f32], m: usize, put: DstWriter<'_>) -> Result<()>;
    /// Row `i < n` dequantized into `out` (`k` values).
    fn row_into(&self, i: usize, out: &mut [f32]) -> Result<()>;
    /// Rows `ids` dequantized, `[ids.len(), k]` (embedding lookup).
    fn rows(&self, ids: &[u32]) -> Result<Tensor> {
        let (n, k) = self.shape();
        check_ids(ids, n)?;
        let mut out = vec![0f32; ids.len() * k];
        for (&id, dst) in ids.iter().zip(out.chunks_exact_mut(k.max(1))) {
            self.row_into(id as usize, dst)?;
        }
        Ok(Tensor::from_vec(out, (ids.len(), k), &Device::Cpu)?)
    }
    /// `x @ W^T` for `x` of shape `[..., k]`.
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (n, k) = self.shape();
        forward_via(x, k, n, |xs, m, put| self.matmul(xs, m, put))
    }
}

/// Builds the k-quant matrix for GGUF bytes of type `t`, if `t` is a k-quant.
pub(crate) fn k_matrix(
    t: GgmlDType,
    bytes: &[u8],
    n: usize,
    k: usize,
) -> Option<Result<std::sync::Arc<dyn WeightMatrix>>> {
    use candle_core::quantized::k_quants::{BlockQ2K, BlockQ3K, BlockQ4K, BlockQ5K, BlockQ6K};
    fn make<T: KBlock>(b: &[u8], n: usize, k: usize) -> Result<std::sync::Arc<dyn WeightMatrix>> {
        Ok(std::sync::Arc::new(KMatrix::<T>::new(b, n, k)?))
    }
    Some(match t {
        GgmlDType::Q4K if q4k::Q4KMatrix::fits(n, k) => q4k::Q4KMatrix::new(bytes, n, k)
            .map(|m| std::sync::Arc::new(m) as std::sync::Arc<dyn WeightMatrix>),
        GgmlDType::Q6K if q6k::Q6KMatrix::fits(n, k) => q6k::Q6KMatrix::new(bytes, n, k)
            .map(|m| std::sync::Arc::new(m) as std::sync::Arc<dyn WeightMatrix>),
        GgmlDType::Q2K => make::<BlockQ2K>(bytes, n, k),
        GgmlDType::Q3K => make::<BlockQ3K>(bytes, n, k),
        GgmlDType::Q4K => make::<BlockQ4K>(bytes, n, k),
        GgmlDType::Q5K => make::<BlockQ5K>(bytes, n, k),
        GgmlDType::Q6K => make::<BlockQ6K>(bytes, n, k),
        _ => return None,
    })
}

/// The candle block types we run: dot products against q8_K activations.
pub(crate) trait KBlock:
    candle_core::quantized::k_quants::GgmlType<
        VecDotType = candle_core::quantized::k_quants::BlockQ8K,
    > + 'static
{
}
impl<T> KBlock for T where
    T: candle_core::quantized::k_quants::GgmlType<
            VecDotType = candle_core::quantized::k_quants::BlockQ8K,
        > + 'static
{
}

/// Weight rows per work item for k-quant matrices, and activation rows.
const K_COLS: usize = 4;
const K_ROWS: usize = 4;

impl<T: KBlock> KMatrix<T> {
    fn new(bytes: &[u8], n: usize, k: usize) -> Result<Self> {
        let size = std::mem::size_of::<T>();
        if !k.is_multiple_of(T::BLCK_SIZE) || bytes.len() != n * (k / T::BLCK_SIZE) * size {
            return Err(Error::InvalidArgument(format!(
                "{:?} matrix [{n}, {k}] cannot hold {} bytes",
                T::DTYPE,
                bytes.len()
            )));
        }
        let blocks = n * (k / T::BLCK_SIZE);
        let mut data: Vec<T> = Vec::with_capacity(blocks);
        // SAFETY: candle's block types are `repr(C)` plain data (f16 and byte arrays) whose
        // layout is GGUF's, and the byte count was checked above.
        unsafe {
            std::ptr::copy_nonoverlapping(
                bytes.as_ptr(),
                data.as_mut_ptr() as *mut u8,
                bytes.len(),
            );
            data.set_len(blocks);
        }
        Ok(KMatrix { n, k, data })
    }

    fn row(&self, j: usize) -> &[T] {
        let nb = self.k / T::BLCK_SIZE;
        &self.data[j * nb..(j + 1) * nb]
    }
}

impl<T: KBlock> WeightMatrix for KMatrix<T> {
    fn dtype(&self) -> GgmlDType {
        T::DTYPE
    }

    fn shape(&self) -> (usize, usize) {
        (self.n, self.k)
    }

    fn bytes(&self) -> usize {
        self.data.len() * std::mem::size_of::<T>()
    }

    fn matmul(&self, xs: &[f32], m: usize, put: DstWriter<'_>) -> Result<()> {
        use candle_core::quantized::k_quants::{BlockQ8K, GgmlType};
        let k = self.k;
        let nbx = k / BlockQ8K::BLCK_SIZE;
        let mut xq = vec![BlockQ8K::zeros(); m * nbx];
        if nbx > 0 {
            for_each_chunk_mut(&mut xq, nbx, &|r, out| {
                BlockQ8K::from_float(&xs[r * k..(r + 1) * k], out)
            });
        }
        let n = self.n;
        let row_tiles = m.div_ceil(K_ROWS);
        let work = |item: usize| {
            let (cg, rt) = (item / row_tiles, item % row_tiles);
            for c in cg * K_COLS..n.min((cg + 1) * K_COLS) {
                let w = self.row(c);
                for r in rt * K_ROWS..m.min((rt + 1) * K_ROWS) {
                    put.put(r, c, &[T::vec_dot(k, w, &xq[r * nbx..(r + 1) * nbx])]);
                }
            }
        };
        run_items(row_tiles * n.div_ceil(K_COLS), &work);
        Ok(())
    }

    fn row_into(&self, i: usize, out: &mut [f32]) -> Result<()> {
        T::to_float(self.row(i), out);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::values;
    use candle_core::quantized::QTensor;

    /// Every path available on this CPU gives the scalar path's products (up to float
    /// summation order), and the scalar path matches an f64 product of the dequantized weights
    /// with the quantized activations; odd shapes exercise partial tiles.
    #[test]
    fn block_matmul_matches_scalar_and_reference() {
        for (fmt, dt) in [
            (BlockFmt::Q4_0, GgmlDType::Q4_0),
            (BlockFmt::Q4_1, GgmlDType::Q4_1),
            (BlockFmt::Q5_0, GgmlDType::Q5_0),
            (BlockFmt::Q5_1, GgmlDType::Q5_1),
            (BlockFmt::Q8_0, GgmlDType::Q8_0),
        ] {
            for (n, k, m) in [
                (37, 96, 5),
                (8, 64, 1),
                (13, 32, 9),
                (16, 64, 6),
                (24, 96, 4),
            ] {
                let w = values(n * k, 7 + n as u32);
                let q = QTensor::quantize(&Tensor::from_vec(w, (n, k), &Device::Cpu).unwrap(), dt)
                    .unwrap();
                let wd: Vec<f32> = q
                    .dequantize(&Device::Cpu)
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .to_vec1()
                    .unwrap();
                let mat = BlockMatrix::new(fmt, &q.data().unwrap(), n, k).unwrap();
                let x = values(m * k, 11 + m as u32);
                let y: Vec<f32> = mat
                    .forward(&Tensor::from_vec(x.clone(), (m, k), &Device::Cpu).unwrap())
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .to_vec1()
                    .unwrap();
                let nb = k / QK;
                for r in 0..m {
                    let mut xq = vec![ZERO_X; nb];
                    quantize_row(&x[r * k..(r + 1) * k], &mut xq);
                    for c in 0..n {
                        let s = dot_scalar(fmt, &mat.gguf_row(c), &xq);
                        let got = y[r * n + c];
                        assert!(
                            (got - s).abs() < 1e-4 * (1.0 + s.abs()),
                            "{fmt:?} {n}x{k}x{m}: simd {got} vs scalar {s} at {r},{c}"
                        );
                        let mut want = 0f64;
                        for (b, xb) in xq.iter().enumerate() {
                            for i in 0..QK {
                                want +=
                                    wd[c * k + b * QK + i] as f64 * (xb.d * xb.qs[i] as f32) as f64;
                            }
                        }
                        // Q4_1's s_x is rounded through f16, as in ggml.
                        assert!(
                            (s as f64 - want).abs() < 2e-2,
                            "{fmt:?} {r},{c}: {s} vs {want}"
                        );
                    }
                }
            }
        }
    }

    /// Against candle's own quantized matmul on model-sized shapes (both quantize the
    /// activations to 8 bits, so they agree to that rounding).
    #[test]
    fn block_matmul_agrees_with_candle() {
        use candle_core::quantized::QMatMul;
        use candle_core::Module;
        for dt in [
            GgmlDType::Q4_0,
            GgmlDType::Q4_1,
            GgmlDType::Q5_0,
            GgmlDType::Q5_1,
            GgmlDType::Q8_0,
        ] {
            for (n, k, m) in [(64, 1536, 1), (72, 576, 7)] {
                let w = values(n * k, 3);
                let q = QTensor::quantize(&Tensor::from_vec(w, (n, k), &Device::Cpu).unwrap(), dt)
                    .unwrap();
                let ours =
                    BlockMatrix::new(BlockFmt::from_ggml(dt).unwrap(), &q.data().unwrap(), n, k)
                        .unwrap();
                let theirs = QMatMul::from_qtensor(q).unwrap();
                let x = Tensor::from_vec(values(m * k, 5), (1, m, k), &Device::Cpu).unwrap();
                let a: Vec<f32> = ours
                    .forward(&x)
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .to_vec1()
                    .unwrap();
                let b: Vec<f32> = theirs
                    .forward(&x)
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .to_vec1()
                    .unwrap();
                let scale = b.iter().fold(0f32, |mx, v| mx.max(v.abs()));
                let d = a
                    .iter()
                    .zip(&b)
                    .map(|(x, y)| (x - y).abs())
                    .fold(0f32, f32::max);
                assert!(
                    d < 0.02 * scale,
                    "{dt:?} {n}x{k}x{m}: max diff {d} (scale {scale})"
                );
            }
        }
    }

    /// k-quant matrices on our pool give candle's own results (same block dot products and
    /// activation quantization), and their rows are candle's dequantization.
    #[test]
    fn k_quant_matrices_equal_candles() {
        use candle_core::quantized::QMatMul;
        use candle_core::Module;
        for dt in [
            GgmlDType::Q2K,
            GgmlDType::Q3K,
            GgmlDType::Q4K,
            GgmlDType::Q5K,
            GgmlDType::Q6K,
        ] {
            let (n, k) = (10, 512);
            let q = QTensor::quantize(
                &Tensor::from_vec(values(n * k, 13), (n, k), &Device::Cpu).unwrap(),
                dt,
            )
            .unwrap();
            let ours = k_matrix(dt, &q.data().unwrap(), n, k).unwrap().unwrap();
            let full: Vec<f32> = q
                .dequantize(&Device::Cpu)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
            let theirs = QMatMul::from_qtensor(q).unwrap();
            for m in [1usize, 6] {
                let x = Tensor::from_vec(values(m * k, 17), (1, m, k), &Device::Cpu).unwrap();
                let a: Vec<f32> = ours
                    .forward(&x)
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .to_vec1()
                    .unwrap();
                let b: Vec<f32> = theirs
                    .forward(&x)
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .to_vec1()
                    .unwrap();
                for (p, q) in a.iter().zip(&b) {
                    assert!(
                        (p - q).abs() <= 1e-5 * (1.0 + q.abs()),
                        "{dt:?} m={m}: {p} vs {q}"
                    );
                }
            }
            let rows: Vec<f32> = ours
                .rows(&[7, 2])
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
            assert_eq!(&rows[..k], &full[7 * k..8 * k], "{dt:?}");
            assert_eq!(&rows[k..], &full[2 * k..3 * k], "{dt:?}");
            assert!(ours.rows(&[10]).is_err());
            assert_eq!(ours.dtype(), dt);
            assert!(k_matrix(dt, &[0u8; 7], n, k).unwrap().is_err());
        }
    }

    #[test]
    fn rows_equal_candles_dequantization() {
        // 9 rows keep the GGUF layout, 16 are stored as interleaved groups.
        for (n, k) in [(9, 64), (16, 96)] {
            for dt in [
                GgmlDType::Q4_0,
                GgmlDType::Q4_1,
                GgmlDType::Q5_0,
                GgmlDType::Q5_1,
                GgmlDType::Q8_0,
            ] {
                let q = QTensor::quantize(
                    &Tensor::from_vec(values(n * k, 9), (n, k), &Device::Cpu).unwrap(),
                    dt,
                )
                .unwrap();
                let full: Vec<f32> = q
                    .dequantize(&Device::Cpu)
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .to_vec1()
                    .unwrap();
                let bytes = q.data().unwrap();
                let mat = BlockMatrix::new(BlockFmt::from_ggml(dt).unwrap(), &bytes, n, k).unwrap();
                let repack = repack();
                assert_eq!(mat.group > 0, repack && n % G == 0);
                let row_bytes = bytes.len() / n;
                for c in 0..n {
                    assert_eq!(mat.gguf_row(c), &bytes[c * row_bytes..(c + 1) * row_bytes]);
                }
                let ids = [3usize, 0, 8, n - 1];
                let got: Vec<f32> = mat
                    .rows(&ids.map(|i| i as u32))
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .to_vec1()
                    .unwrap();
                for (i, &id) in ids.iter().enumerate() {
                    assert_eq!(
                        &got[i * k..(i + 1) * k],
                        &full[id * k..(id + 1) * k],
                        "{dt:?}"
                    );
                }
                assert!(mat.rows(&[n as u32]).is_err());
            }
        }
    }

    #[test]
    fn f16_matmul_matches_f64_for_decode_and_prompt_shapes() {
        for (n, k) in [(21, 100), (32, 100), (48, 7)] {
            f16_case(n, k);
        }
    }

    fn f16_case(n: usize, k: usize) {
        let w: Vec<f32> = values(n * k, 4)
            .iter()
            .map(|v| f16::from_f32(*v).to_f32())
            .collect();
        let mat = F16Matrix::from_rows(w.iter().map(|v| f16::from_f32(*v)).collect(), n, k);
        for m in [1usize, 3, 6, 7, 12, 13, 25, 61] {
            let x = values(m * k, 8 + m as u32);
            let y: Vec<f32> = mat
                .forward(&Tensor::from_vec(x.clone(), (1, m, k), &Device::Cpu).unwrap())
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
            for r in 0..m {
                for c in 0..n {
                    let want: f64 = (0..k)
                        .map(|i| w[c * k + i] as f64 * x[r * k + i] as f64)
                        .sum();
                    assert!((y[r * n + c] as f64 - want).abs() < 1e-4, "m={m} {r},{c}");
                }
            }
        }
        let rows: Vec<f32> = mat
            .rows(&[2, n as u32 - 1])
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        assert_eq!(&rows[..k], &w[2 * k..3 * k]);
        assert_eq!(&rows[k..], &w[(n - 1) * k..n * k]);
    }

    /// The 512-bit f16 tiles (one group, two groups) give bit for bit what the 256-bit one
    /// gives.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn f16_wide_tile_equals_narrow_tile() {
        if !(is_x86_feature_detected!("avx512f") && simd()) {
            return;
        }
        let k = 77;
        let w: Vec<f16> = values(FG * k, 31)
            .iter()
            .map(|v| f16::from_f32(*v))
            .collect();
        let x = values(4 * k, 32);
        let xp: [*const f32; 4] = std::array::from_fn(|r| x[r * k..].as_ptr());
        let (mut a, mut b) = ([[0f32; FG]; 4], [[0f32; FG]; 4]);
        let (mut a1, mut b1) = ([[0f32; FG]; 1], [[0f32; FG]; 1]);
        // SAFETY: the features were detected above; `w` holds k positions of 16 values and
        // every row of `x` k values.
        unsafe {
            f16_group_avx512::<4>(w.as_ptr(), xp, k, &mut a);
            f16_group_avx2::<4>(w.as_ptr(), xp, k, &mut b);
            f16_group_avx512::<1>(w.as_ptr(), [xp[0]], k, &mut a1);
            f16_group_avx2::<1>(w.as_ptr(), [xp[0]], k, &mut b1);
        }
        assert_eq!(a, b);
        assert_eq!(a1, b1);
        // Two groups at once.
        let w2: Vec<f16> = values(2 * FG * k, 33)
            .iter()
            .map(|v| f16::from_f32(*v))
            .collect();
        let mut w2f = vec![0f32; w2.len()];
        let mut pair = [[0f32; 2 * FG]; 4];
        let (mut g0, mut g1) = ([[0f32; FG]; 4], [[0f32; FG]; 4]);
        // SAFETY: as above; `w2` holds two groups.
        unsafe {
            f16_to_f32_avx512(w2.as_ptr(), w2f.as_mut_ptr(), w2.len());
            f32_group2_avx512::<4>(w2f.as_ptr(), xp, k, &mut pair);
            f16_group_avx2::<4>(w2.as_ptr(), xp, k, &mut g0);
            f16_group_avx2::<4>(w2[FG * k..].as_ptr(), xp, k, &mut g1);
        }
        for r in 0..4 {
            assert_eq!(pair[r][..FG], g0[r]);
            assert_eq!(pair[r][FG..], g1[r]);
        }
    }

    #[test]
    fn swiglu_matches_candles_silu_times_up() {
        // Rows that do not divide the pool's chunks: chunks start and end inside rows.
        let (rows, width) = (5, 2 * 4096 + 13);
        let n = rows * width;
        let mut g = values(n, 41);
        for v in g.iter_mut() {
            *v *= 12.0;
        }
        g[0] = 100.0;
        g[1] = -100.0;
        g[2] = 0.0;
        let u = values(n, 42);
        let (gt, ut) = (
            Tensor::from_vec(g, (rows, width), &Device::Cpu).unwrap(),
            Tensor::from_vec(u, (rows, width), &Device::Cpu).unwrap(),
        );
        let got: Vec<f32> = swiglu(&gt, &ut)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let want: Vec<f32> = (candle_nn::ops::silu(&gt).unwrap() * &ut)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        for (i, (a, b)) in got.iter().zip(&want).enumerate() {
            assert!((a - b).abs() <= 1e-6 * (1.0 + b.abs()), "{i}: {a} vs {b}");
        }
        assert!(swiglu(&gt, &gt.narrow(1, 0, 5).unwrap()).is_err());
    }

    #[test]
    fn simd_activation_quantization_equals_scalar() {
        let mut x = values(QK * 40, 21);
        // Exact ties after scaling, and an all-zero block.
        x[5] = 0.5;
        x[6] = 1.0;
        for v in &mut x[64..96] {
            *v = 0.0;
        }
        let mut a = vec![ZERO_X; 40];
        let mut b = vec![ZERO_X; 40];
        quantize_row(&x, &mut a);
        quantize_row_scalar(&x, &mut b);
        for (p, q) in a.iter().zip(&b) {
            assert_eq!(p.qs, q.qs);
            assert_eq!((p.d, p.s, p.sum), (q.d, q.s, q.sum));
        }
    }

    #[test]
    fn quantized_activations_follow_ggml() {
        let mut out = [ZERO_X; 1];
        let mut x = [0f32; QK];
        x[0] = 1.0;
        x[1] = -0.5;
        x[2] = 0.25 / 127.0 * 127.0 * 0.5 / 127.0 * 127.0; // 0.125 -> 15.875 -> 16
        quantize_row(&x, &mut out);
        assert_eq!(out[0].qs[0], 127);
        assert_eq!(out[0].qs[1], -64); // -63.5 rounds to even
        assert_eq!(out[0].qs[2], 16);
        assert_eq!(out[0].d, f16::from_f32(1.0 / 127.0).to_f32());
        let zero = [0f32; QK];
        quantize_row(&zero, &mut out);
        assert!(out[0].qs.iter().all(|&q| q == 0) && out[0].d == 0.0);
    }
}
