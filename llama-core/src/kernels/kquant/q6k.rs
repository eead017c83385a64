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
//! Group layout, per group of 8 rows (16 with the 512-bit kernels) and super-block (8 rows:
//! 1680 bytes, as in GGUF): the `d` (f16), the scales `[group][row]`, then for each half `n` of
//! the block and 4-byte piece `j` of its first 32 positions, 12 bytes a row (96 for 8 rows):
//! the 6-bit values of positions `4j..`
//! (quarter 0) with the high bit pairs of quarter 1 in their top bits, the `ql` bytes of
//! positions `32+4j..` (the low nibbles of quarters 1 and 3), and the values of quarter 2 with
//! quarter 3's high bits on top. One piece gives, for 8 rows, the 6-bit values of 4 elements in
//! each quarter of the half in a few masks and shifts, each paired with one broadcast of four
//! activation bytes in a `dpbusd` (or `maddubs` + `madd`).

use half::f16;

use super::q4k::{group_matmul, row_slices, G16, TILE_R, XK};
use super::{isa, DstWriter, Isa};
use crate::error::Result;

const QK_K: usize = 256;
const GGUF_BYTES: usize = 210;
/// Rows per group: 8 for the 256-bit kernels, 16 for the 512-bit ones.
const G: usize = 8;

/// Offsets inside a group block of `gs` rows.
const fn sc_at(gs: usize) -> usize {
    2 * gs
}
const fn q_at(gs: usize) -> usize {
    sc_at(gs) + 16 * gs
}
const fn piece(gs: usize) -> usize {
    12 * gs
}
const fn group_bytes(gs: usize) -> usize {
    q_at(gs) + 16 * piece(gs)
}

/// A Q6_K matrix `[n, k]` with `n % 8 == 0`, in the group layout above (groups of 16 rows
/// when the 512-bit kernels run and `n % 16 == 0`).
pub(crate) struct Q6KMatrix {
    n: usize,
    k: usize,
    gs: usize,
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
        let gs = if isa() == Isa::Avx512 && n.is_multiple_of(G16) {
            G16
        } else {
            G
        };
        let gbytes = group_bytes(gs);
        let mut data = crate::kernels::zeroed_weights::<u8>(n / gs * nb * gbytes);
        for (g, dst) in data.chunks_exact_mut(nb * gbytes).enumerate() {
            for (b, gb) in dst.chunks_exact_mut(gbytes).enumerate() {
                for r in 0..gs {
                    let src = &bytes[((g * gs + r) * nb + b) * GGUF_BYTES..][..GGUF_BYTES];
                    let (ql, qh, sc, d) =
                        (&src[..128], &src[128..192], &src[192..208], &src[208..]);
                    gb[2 * r..2 * r + 2].copy_from_slice(d);
                    for (s, &v) in sc.iter().enumerate() {
                        gb[sc_at(gs) + s * gs + r] = v;
                    }
                    for half in 0..2 {
                        for j in 0..8 {
                            let at = q_at(gs) + (half * 8 + j) * piece(gs) + 4 * r;
                            let l = 4 * j;
                            for e in 0..4 {
                                let (a, h) = (ql[64 * half + l + e], qh[32 * half + l + e]);
                                // Quarter 0's value with quarter 1's high bits on top, and
                                // quarter 2's with quarter 3's.
                                gb[at + e] = (a & 0xF) | ((h & 0x0F) << 4);
                                gb[at + 4 * gs + e] = ql[64 * half + 32 + l + e];
                                gb[at + 8 * gs + e] = (a >> 4) | (h & 0xF0);
                            }
                        }
                    }
                }
            }
        }
        Ok(Q6KMatrix { n, k, gs, data })
    }

    fn group_block(&self, g: usize, b: usize) -> &[u8] {
        let (nb, gbytes) = (self.k / QK_K, group_bytes(self.gs));
        &self.data[(g * nb + b) * gbytes..][..gbytes]
    }

    /// The 6-bit value (0..64) of element `e` of row `r` in a group block.
    fn quant(&self, gb: &[u8], r: usize, e: usize) -> u8 {
        let gs = self.gs;
        let (half, within) = (e / 128, e % 128);
        let (t, l) = (within / 32, within % 32);
        let (j, byte) = (l / 4, l % 4);
        let at = q_at(gs) + (half * 8 + j) * piece(gs) + 4 * r + byte;
        let (lo, b, hi) = (gb[at], gb[at + 4 * gs], gb[at + 8 * gs]);
        match t {
            0 => lo & 0x3F,
            1 => (b & 0xF) | ((lo >> 2) & 0x30),
            2 => hi & 0x3F,
            _ => (b >> 4) | ((hi >> 2) & 0x30),
        }
    }

    fn d_sc(&self, gb: &[u8], r: usize, s: usize) -> (f32, i8) {
        (
            f16::from_le_bytes([gb[2 * r], gb[2 * r + 1]]).to_f32(),
            gb[sc_at(self.gs) + s * self.gs + r] as i8,
        )
    }

    /// Rows `start..` into `out`, one after another.
    fn dequantize_rows(&self, start: usize, out: &mut [f32]) {
        crate::kernels::rows_one_by_one(self.k, start, out, |i, dst| self.dequantize_row(i, dst));
    }

    /// Row `c` dequantized (candle's and llama.cpp's arithmetic: `d * sc * (q - 32)`).
    fn dequantize_row(&self, c: usize, out: &mut [f32]) {
        let (g, r) = (c / self.gs, c % self.gs);
        for (b, ob) in out.chunks_exact_mut(QK_K).enumerate() {
            let gb = self.group_block(g, b);
            for (e, o) in ob.iter_mut().enumerate() {
                let (d, sc) = self.d_sc(gb, r, e / 16);
                *o = d * sc as f32 * (self.quant(gb, r, e) as i8 - 32) as f32;
            }
        }
    }

    /// Scalar path over the group layout (same integers as the SIMD kernels).
    fn tile_scalar(&self, g: usize, x: &[&[XK]], out: &mut [[f32; G16]]) {
        let nb = self.k / QK_K;
        for (xr, o) in x.iter().zip(out.iter_mut()) {
            *o = [0.0; G16];
            for b in 0..nb {
                let gb = self.group_block(g, b);
                let xb = &xr[b];
                for (r, or) in o.iter_mut().enumerate().take(self.gs) {
                    let mut sumi = 0i32;
                    for s in 0..16 {
                        let dot: i32 = (16 * s..16 * (s + 1))
                            .map(|e| self.quant(gb, r, e) as i32 * xb.qs[e] as i32)
                            .sum();
                        let (_, sc) = self.d_sc(gb, r, s);
                        sumi += (dot - 32 * xb.s16[s] as i32) * sc as i32;
                    }
                    let (d, _) = self.d_sc(gb, r, 0);
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
                let p = w.add(b * group_bytes(G));
                if stream {
                    super::prefetch_ahead(p, group_bytes(G));
                }
                let dw = _mm256_cvtph_ps(_mm_loadu_si128(p as *const __m128i));
                let mut sumi = [_mm256_setzero_si256(); R];
                for half in 0..2 {
                    for is in 0..2 {
                        let mut isum = [[_mm256_setzero_si256(); R]; 4];
                        for jj in 0..4 {
                            let j = 4 * is + jj;
                            let base = p.add(q_at(G) + (half * 8 + j) * piece(G));
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
                                p.add(sc_at(G) + s * G) as *const __m128i
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

/// [`q6k_vnni`] on 512-bit vectors over groups of 16 rows.
#[cfg(target_arch = "x86_64")]
/// # Safety
/// The CPU supports `avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c` (the caller checked at
/// run time). `w` starts a group of `nb` super-blocks and every `x` a row of `nb` q8_K blocks.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
unsafe fn q6k_avx512<const R: usize>(
    w: *const u8,
    x: [*const XK; R],
    nb: usize,
    out: &mut [[f32; G16]; R],
    stream: bool,
) {
    use std::arch::x86_64::*;
    let m4 = _mm512_set1_epi8(0x0F);
    let m2 = _mm512_set1_epi8(0x30);
    let m6 = _mm512_set1_epi8(0x3F);
    let mut acc = [_mm512_setzero_ps(); R];
    for b in 0..nb {
        let p = w.add(b * group_bytes(G16));
        if stream {
            super::prefetch_ahead(p, group_bytes(G16));
        }
        let dw = _mm512_cvtph_ps(_mm256_loadu_si256(p as *const __m256i));
        let mut sumi = [_mm512_setzero_si512(); R];
        for half in 0..2 {
            for is in 0..2 {
                let mut isum = [[_mm512_setzero_si512(); R]; 4];
                for jj in 0..4 {
                    let j = 4 * is + jj;
                    let base = p.add(q_at(G16) + (half * 8 + j) * piece(G16));
                    let lo = _mm512_loadu_si512(base as *const _);
                    let bq = _mm512_loadu_si512(base.add(4 * G16) as *const _);
                    let hi = _mm512_loadu_si512(base.add(8 * G16) as *const _);
                    let q: [__m512i; 4] = [
                        _mm512_and_si512(lo, m6),
                        _mm512_or_si512(
                            _mm512_and_si512(bq, m4),
                            _mm512_and_si512(_mm512_srli_epi16::<2>(lo), m2),
                        ),
                        _mm512_and_si512(hi, m6),
                        _mm512_or_si512(
                            _mm512_and_si512(_mm512_srli_epi16::<4>(bq), m4),
                            _mm512_and_si512(_mm512_srli_epi16::<2>(hi), m2),
                        ),
                    ];
                    for (t, qv) in q.iter().enumerate() {
                        for r in 0..R {
                            let xq = (*x[r].add(b)).qs.as_ptr().add(128 * half + 32 * t + 4 * j);
                            let y = _mm512_set1_epi32((xq as *const i32).read_unaligned());
                            isum[t][r] = _mm512_dpbusd_epi32(isum[t][r], *qv, y);
                        }
                    }
                }
                for (t, it) in isum.iter().enumerate() {
                    let s = 8 * half + 2 * t + is;
                    let sc = _mm512_cvtepi8_epi32(_mm_loadu_si128(
                        p.add(sc_at(G16) + s * G16) as *const __m128i
                    ));
                    for r in 0..R {
                        let off = _mm512_set1_epi32(32 * (*x[r].add(b)).s16[s] as i32);
                        sumi[r] = _mm512_add_epi32(
                            sumi[r],
                            _mm512_mullo_epi32(_mm512_sub_epi32(it[r], off), sc),
                        );
                    }
                }
            }
        }
        for r in 0..R {
            let dx = _mm512_set1_ps((*x[r].add(b)).d);
            acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sumi[r]), _mm512_mul_ps(dw, dx), acc[r]);
        }
    }
    for r in 0..R {
        _mm512_storeu_ps(out[r].as_mut_ptr(), acc[r]);
    }
}

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
        let (isa, nb, gs) = (isa(), self.k / QK_K, self.gs);
        group_matmul(
            xs,
            m,
            (self.n, self.k),
            gs,
            put,
            &|g, rows, x, xq, out, stream| {
                let w = self.group_block(g, 0).as_ptr();
                #[cfg(target_arch = "x86_64")]
                if gs == G16 {
                    // SAFETY: 16-row groups only with AVX-512 (checked at run time); `w` starts
                    // the group's `nb` super-blocks and every `x` a row of `nb` blocks.
                    unsafe {
                        if rows.len() == 1 {
                            let mut one = [[0f32; G16]; 1];
                            q6k_avx512::<1>(w, [x[0]], nb, &mut one, stream);
                            out[0] = one[0];
                        } else {
                            q6k_avx512::<TILE_R>(w, x, nb, out, stream);
                        }
                    }
                    return;
                }
                let mut part = [[0f32; G]; TILE_R];
                match isa {
                    #[cfg(target_arch = "x86_64")]
                    Isa::Avx2 | Isa::Vnni | Isa::Avx512 => {
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
                        let mut wide = [[0f32; G16]; TILE_R];
                        self.tile_scalar(g, &row_slices(xq, rows, nb), &mut wide[..n]);
                        for (p, o) in part.iter_mut().zip(&wide) {
                            p.copy_from_slice(&o[..G]);
                        }
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
            |m| m.gs,
            |m, g, x, out| m.tile_scalar(g, x, out),
        );
    }
}
