//! Q6_K matrices stored as interleaved groups of 8 rows, with SIMD kernels of our own (the
//! output head and part of the layers of `Q4_K_M` files; candle 0.11 runs one row per dot
//! product).
//!
//! A Q6_K super-block holds 256 weights: 4 low bits (`ql`), 2 high bits (`qh`), 16 signed
//! 8-bit scales (one per 16 weights) and an f16 `d`; weight `i` is `d * sc[i / 16] * (q_i - 32)`
//! with `q_i` in `0..64`. Against q8_K activations (quantized as llama.cpp does) a super-block
//! contributes `d_x d sum_g sc_g (I_g - 32 S_g)` with the exact integer dots `I_g` and
//! activation sums `S_g` of each 16-weight group.
//!
//! Group layout, per group of 8 rows and super-block (1680 bytes, as in GGUF): the 8 `d`
//! (f16), the scales `[group][row]`, then for each half `n` of the block and 4-byte piece `j`
//! of its first 32 positions, 96 bytes for the 8 rows: the 6-bit values of positions `4j..`
//! (quarter 0) with the high bit pairs of quarter 1 in their top bits, the `ql` bytes of
//! positions `32+4j..` (the low nibbles of quarters 1 and 3), and the values of quarter 2 with
//! quarter 3's high bits on top. One piece gives, for 8 rows, the 6-bit values of 4 elements in
//! each quarter of the half in a few masks and shifts, each paired with one broadcast of four
//! activation bytes in a `dpbusd` (or `maddubs` + `madd`).

use half::f16;

use super::q4k::{group_matmul, row_slices, TILE_R, XK};
use super::{isa, DstWriter, Isa, WeightMatrix};
use crate::error::Result;

const QK_K: usize = 256;
const GGUF_BYTES: usize = 210;
const G: usize = 8;
const SC_AT: usize = 2 * G;
const Q_AT: usize = SC_AT + 16 * G;
const PIECE: usize = 12 * G;
const GROUP_BYTES: usize = Q_AT + 16 * PIECE;

/// A Q6_K matrix `[n, k]` with `n % 8 == 0`, in the group layout above.
pub(crate) struct Q6KMatrix {
    n: usize,
    k: usize,
    data: Vec<u8>,
}

impl Q6KMatrix {
    /// Whether this layout and its kernels serve a `[n, k]` matrix on this machine.
    pub(crate) fn fits(n: usize, k: usize) -> bool {
        super::grouped_layout_fits(n, k, G)
    }

    /// Rearranges GGUF Q6_K bytes of a `[n, k]` matrix.
    pub(crate) fn new(bytes: &[u8], n: usize, k: usize) -> Result<Self> {
        let nb = super::check_gguf_bytes("Q6_K", bytes, (n, k), G, GGUF_BYTES)?;
        let mut data = vec![0u8; n / G * nb * GROUP_BYTES];
        for (g, dst) in data.chunks_exact_mut(nb * GROUP_BYTES).enumerate() {
            for (b, gb) in dst.chunks_exact_mut(GROUP_BYTES).enumerate() {
                for r in 0..G {
                    let src = &bytes[((g * G + r) * nb + b) * GGUF_BYTES..][..GGUF_BYTES];
                    let (ql, qh, sc, d) =
                        (&src[..128], &src[128..192], &src[192..208], &src[208..]);
                    gb[2 * r..2 * r + 2].copy_from_slice(d);
                    for (s, &v) in sc.iter().enumerate() {
                        gb[SC_AT + s * G + r] = v;
                    }
                    for half in 0..2 {
                        for j in 0..8 {
                            let at = Q_AT + (half * 8 + j) * PIECE + 4 * r;
                            let l = 4 * j;
                            for e in 0..4 {
                                let (a, h) = (ql[64 * half + l + e], qh[32 * half + l + e]);
                                // Quarter 0's value with quarter 1's high bits on top, and
                                // quarter 2's with quarter 3's.
                                gb[at + e] = (a & 0xF) | ((h & 0x0F) << 4);
                                gb[at + 4 * G + e] = ql[64 * half + 32 + l + e];
                                gb[at + 8 * G + e] = (a >> 4) | (h & 0xF0);
                            }
                        }
                    }
                }
            }
        }
        Ok(Q6KMatrix { n, k, data })
    }

    fn group_block(&self, g: usize, b: usize) -> &[u8] {
        let nb = self.k / QK_K;
        &self.data[(g * nb + b) * GROUP_BYTES..][..GROUP_BYTES]
    }

    /// The 6-bit value (0..64) of element `e` of row `r` in a group block.
    fn quant(gb: &[u8], r: usize, e: usize) -> u8 {
        let (half, within) = (e / 128, e % 128);
        let (t, l) = (within / 32, within % 32);
        let (j, byte) = (l / 4, l % 4);
        let at = Q_AT + (half * 8 + j) * PIECE + 4 * r + byte;
        let (lo, b, hi) = (gb[at], gb[at + 4 * G], gb[at + 8 * G]);
        match t {
            0 => lo & 0x3F,
            1 => (b & 0xF) | ((lo >> 2) & 0x30),
            2 => hi & 0x3F,
            _ => (b >> 4) | ((hi >> 2) & 0x30),
        }
    }

    fn d_sc(gb: &[u8], r: usize, s: usize) -> (f32, i8) {
        (
            f16::from_le_bytes([gb[2 * r], gb[2 * r + 1]]).to_f32(),
            gb[SC_AT + s * G + r] as i8,
        )
    }

    /// Rows `start..` into `out`, one after another.
    fn dequantize_rows(&self, start: usize, out: &mut [f32]) {
        crate::kernels::rows_one_by_one(self.k, start, out, |i, dst| self.dequantize_row(i, dst));
    }

    /// Row `c` dequantized (candle's and llama.cpp's arithmetic: `d * sc * (q - 32)`).
    fn dequantize_row(&self, c: usize, out: &mut [f32]) {
        let (g, r) = (c / G, c % G);
        for (b, ob) in out.chunks_exact_mut(QK_K).enumerate() {
            let gb = self.group_block(g, b);
            for (e, o) in ob.iter_mut().enumerate() {
                let (d, sc) = Self::d_sc(gb, r, e / 16);
                *o = d * sc as f32 * (Self::quant(gb, r, e) as i8 - 32) as f32;
            }
        }
    }

    /// Scalar path over the group layout (same integers as the SIMD kernels).
    fn tile_scalar(&self, g: usize, x: &[&[XK]], out: &mut [[f32; G]]) {
        let nb = self.k / QK_K;
        for (xr, o) in x.iter().zip(out.iter_mut()) {
            *o = [0.0; G];
            for b in 0..nb {
                let gb = self.group_block(g, b);
                let xb = &xr[b];
                for (r, or) in o.iter_mut().enumerate() {
                    let mut sumi = 0i32;
                    for s in 0..16 {
                        let dot: i32 = (16 * s..16 * (s + 1))
                            .map(|e| Self::quant(gb, r, e) as i32 * xb.qs[e] as i32)
                            .sum();
                        let (_, sc) = Self::d_sc(gb, r, s);
                        sumi += (dot - 32 * xb.s16[s] as i32) * sc as i32;
                    }
                    let (d, _) = Self::d_sc(gb, r, 0);
                    *or += xb.d * d * sumi as f32;
                }
            }
        }
    }
}

/// `R` activation rows times the 8 rows of the group at `w`, over `nb` super-blocks.
#[cfg(target_arch = "x86_64")]
macro_rules! q6k_group {
    ($name:ident, $features:literal, $vnni:expr) => {
        /// # Safety
        /// The CPU supports the features this instance is compiled for (the caller checked at run
        /// time). `w` starts a group of `nb` super-blocks and every `x` a row of `nb` q8_K
        /// blocks.
        #[target_feature(enable = $features)]
        unsafe fn $name<const R: usize>(
            w: *const u8,
            x: [*const XK; R],
            nb: usize,
            out: &mut [[f32; G]; R],
            stream: bool,
        ) {
            use std::arch::x86_64::*;
            let m4 = _mm256_set1_epi8(0x0F);
            let m2 = _mm256_set1_epi8(0x30);
            let m6 = _mm256_set1_epi8(0x3F);
            let ones = _mm256_set1_epi16(1);
            let mut acc = [_mm256_setzero_ps(); R];
            for b in 0..nb {
                let p = w.add(b * GROUP_BYTES);
                if stream {
                    super::prefetch_ahead(p, GROUP_BYTES);
                }
                let dw = _mm256_cvtph_ps(_mm_loadu_si128(p as *const __m128i));
                let mut sumi = [_mm256_setzero_si256(); R];
                for half in 0..2 {
                    for is in 0..2 {
                        let mut isum = [[_mm256_setzero_si256(); R]; 4];
                        for jj in 0..4 {
                            let j = 4 * is + jj;
                            let base = p.add(Q_AT + (half * 8 + j) * PIECE);
                            let lo = _mm256_loadu_si256(base as *const __m256i);
                            let bq = _mm256_loadu_si256(base.add(4 * G) as *const __m256i);
                            let hi = _mm256_loadu_si256(base.add(8 * G) as *const __m256i);
                            let q: [__m256i; 4] = [
                                _mm256_and_si256(lo, m6),
                                _mm256_or_si256(
                                    _mm256_and_si256(bq, m4),
                                    _mm256_and_si256(_mm256_srli_epi16::<2>(lo), m2),
                                ),
                                _mm256_and_si256(hi, m6),
                                _mm256_or_si256(
                                    _mm256_and_si256(_mm256_srli_epi16::<4>(bq), m4),
                                    _mm256_and_si256(_mm256_srli_epi16::<2>(hi), m2),
                                ),
                            ];
                            for (t, qv) in q.iter().enumerate() {
                                for r in 0..R {
                                    let xq =
                                        (*x[r].add(b)).qs.as_ptr().add(128 * half + 32 * t + 4 * j);
                                    let y = _mm256_set1_epi32((xq as *const i32).read_unaligned());
                                    isum[t][r] = if $vnni {
                                        _mm256_dpbusd_epi32(isum[t][r], *qv, y)
                                    } else {
                                        _mm256_add_epi32(
                                            isum[t][r],
                                            _mm256_madd_epi16(_mm256_maddubs_epi16(*qv, y), ones),
                                        )
                                    };
                                }
                            }
                        }
                        for (t, it) in isum.iter().enumerate() {
                            let s = 8 * half + 2 * t + is;
                            let sc = _mm256_cvtepi8_epi32(_mm_loadl_epi64(
                                p.add(SC_AT + s * G) as *const __m128i
                            ));
                            for r in 0..R {
                                let off = _mm256_set1_epi32(32 * (*x[r].add(b)).s16[s] as i32);
                                sumi[r] = _mm256_add_epi32(
                                    sumi[r],
                                    _mm256_mullo_epi32(_mm256_sub_epi32(it[r], off), sc),
                                );
                            }
                        }
                    }
                }
                for r in 0..R {
                    let dx = _mm256_set1_ps((*x[r].add(b)).d);
                    acc[r] =
                        _mm256_fmadd_ps(_mm256_cvtepi32_ps(sumi[r]), _mm256_mul_ps(dw, dx), acc[r]);
                }
            }
            for r in 0..R {
                _mm256_storeu_ps(out[r].as_mut_ptr(), acc[r]);
            }
        }
    };
}

#[cfg(target_arch = "x86_64")]
q6k_group!(q6k_avx2, "avx2,fma,f16c", false);
#[cfg(target_arch = "x86_64")]
q6k_group!(q6k_vnni, "avx2,fma,f16c,avx512vnni,avx512vl", true);

impl Q6KMatrix {
    /// No training panels: rows are dequantized whole.
    fn has_panels(&self) -> bool {
        false
    }
    fn panel_t(&self, _: std::ops::Range<usize>, _: std::ops::Range<usize>, _: &mut [f32]) {}
}

our_weight_matrix!(Q6KMatrix, |_| candle_core::quantized::GgmlDType::Q6K, true);

impl Q6KMatrix {
    /// `xs @ W^T` for `m` rows of `k` values, every output written through `put`.
    fn compute(&self, xs: &[f32], m: usize, put: DstWriter<'_>) {
        let (isa, nb) = (isa(), self.k / QK_K);
        group_matmul(
            xs,
            m,
            self.shape(),
            G,
            put,
            &|g, rows, x, xq, out, stream| {
                let mut part = [[0f32; G]; TILE_R];
                match isa {
                    #[cfg(target_arch = "x86_64")]
                    Isa::Avx2 | Isa::Vnni | Isa::Avx512 => {
                        let w = self.group_block(g, 0).as_ptr();
                        // SAFETY: the CPU has the features (checked at run time); `w` starts the
                        // group's `nb` super-blocks and every `x` a row of `nb` blocks.
                        unsafe {
                            let vnni = isa.vnni();
                            if rows.len() == 1 {
                                let mut one = [[0f32; G]; 1];
                                if vnni {
                                    q6k_vnni::<1>(w, [x[0]], nb, &mut one, stream)
                                } else {
                                    q6k_avx2::<1>(w, [x[0]], nb, &mut one, stream)
                                }
                                part[0] = one[0];
                            } else if vnni {
                                q6k_vnni::<TILE_R>(w, x, nb, &mut part, stream)
                            } else {
                                q6k_avx2::<TILE_R>(w, x, nb, &mut part, stream)
                            }
                        }
                    }
                    _ => {
                        let n = rows.len();
                        self.tile_scalar(g, &row_slices(xq, rows, nb), &mut part[..n])
                    }
                }
                for (o, p) in out.iter_mut().zip(&part) {
                    o[..G].copy_from_slice(p);
                }
            },
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::quantized::GgmlDType;

    /// Rows equal candle's dequantization; products equal the scalar path over the same
    /// integers and agree with candle's Q6_K matmul.
    #[test]
    fn q6k_matrix_matches_scalar_and_candle() {
        crate::kernels::check_kquant(
            GgmlDType::Q6K,
            5,
            |b, n, k| Q6KMatrix::new(b, n, k).unwrap(),
            |_| G,
            |m, g, x, out| m.tile_scalar(g, x, out),
        );
    }
}
