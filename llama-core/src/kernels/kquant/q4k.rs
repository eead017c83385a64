//! Q4_K and Q5_K matrices stored as interleaved groups of 8 rows, with SIMD kernels of our own
//! (the formats of most `Q4_K_M` and `Q5_K_M` files; candle 0.11 runs one row per dot product).
//!
//! A Q4_K super-block holds 256 weights: f16 `d` and `dmin`, eight 6-bit scales and mins (one
//! per 32 weights, packed in 12 bytes) and 4-bit quants; weight `i` is
//! `d * sc[i / 32] * q_i - dmin * m[i / 32]`. Activations are quantized to q8_K blocks exactly
//! as llama.cpp does (`-127 / max` with the signed extreme, nearest-even rounding), so each
//! super-block contributes `d_x (d sum_s sc_s I_s - dmin sum_s m_s S_s)` with the exact integer
//! dots `I_s` and activation sums `S_s` of sub-block `s`.
//!
//! Group layout, per group of 8 rows (16 with the 512-bit kernels) and super-block (8 rows:
//! 1248 bytes, GGUF: 1152): the `d`, the `dmin` (f16), the scales decoded to bytes
//! `[sub-block][row]`, the mins as 16-bit pairs `[sub-block pair][row][2]`, then the quants in
//! 4-byte pieces `[pair][piece][row]` (the low nibbles of pair `p` are sub-block `2p`, the high
//! ones `2p + 1`). One 32-byte load then holds the same 8 quants of 8 rows (64 bytes, 16 rows); a `dpbusd` (or `maddubs` + `madd`) against a broadcast of four
//! activation bytes sums them with each row in its own lane, a 32-bit multiply applies the
//! eight rows' scales, and one `madd` per sub-block pair applies the mins.
//!
//! Q5_K adds a fifth (high) bit to every quant, `q_i` in `0..32`, with the same scales and mins.
//! Its group block appends a high-bit plane after the quants: per 4-byte piece `j` and row, the
//! four bytes `qh[4j..4j + 4]` of GGUF's high-bit bytes with their bits reordered (the bit of
//! sub-block `2p` at bit `p`, that of `2p + 1` at bit `4 + p`), so that one shift of the piece's
//! 32 (64) bytes by `p` puts pair `p`'s high bits at bits 0 and 4 of every byte, next to the
//! nibbles they complete (1504 bytes per 8 rows and super-block; GGUF: 1408).

use half::f16;

use super::{isa, run_items, DstWriter, Isa};
use crate::error::Result;

pub(crate) const QK_K: usize = 256;
/// GGUF bytes per super-block: Q4_K, Q5_K.
const fn gguf_bytes(five: bool) -> usize {
    if five {
        176
    } else {
        144
    }
}
/// Rows per group: 8 for the 256-bit kernels, 16 for the 512-bit ones.
const G: usize = 8;
pub(super) const G16: usize = 16;
/// Activation rows per prompt tile.
pub(super) const TILE_R: usize = 4;

/// Offsets inside a group block of `gs` rows.
const fn dmin_at(gs: usize) -> usize {
    2 * gs
}
const fn sc_at(gs: usize) -> usize {
    4 * gs
}
const fn m_at(gs: usize) -> usize {
    sc_at(gs) + 8 * gs
}
const fn q_at(gs: usize) -> usize {
    m_at(gs) + 16 * gs
}
/// The Q5_K high-bit plane.
const fn qh_at(gs: usize) -> usize {
    q_at(gs) + 128 * gs
}
const fn group_bytes(gs: usize, five: bool) -> usize {
    qh_at(gs) + if five { 32 * gs } else { 0 }
}

/// Where the Q5_K layout keeps the high bit of sub-block `s` in a reordered high-bit byte.
const fn high_bit(s: usize) -> usize {
    if s.is_multiple_of(2) {
        s / 2
    } else {
        4 + s / 2
    }
}

/// One q8_K activation block: scale, quants, and the sums of each 32-quant sub-block.
#[derive(Clone, Copy)]
#[repr(C, align(32))]
pub(crate) struct XK {
    pub(super) d: f32,
    /// Sums of each 32-quant sub-block (Q4_K's mins).
    pub(super) sub: [i16; 8],
    /// Sums of each 16 quants (Q6_K's offset).
    pub(super) s16: [i16; 16],
    pub(super) qs: [i8; QK_K],
}

pub(super) const ZERO_XK: XK = XK {
    d: 0.0,
    sub: [0; 8],
    s16: [0; 16],
    qs: [0; QK_K],
};

/// llama.cpp's `quantize_row_q8_K_ref`: the element of largest magnitude (first one on ties)
/// maps to -127, quants rounded to nearest even.
pub(super) fn quantize_q8k(x: &[f32], out: &mut [XK]) {
    for (xb, ob) in x.chunks_exact(QK_K).zip(out.iter_mut()) {
        let (mut amax, mut max) = (0f32, 0f32);
        for &v in xb {
            if v.abs() > amax {
                amax = v.abs();
                max = v;
            }
        }
        if amax == 0.0 {
            *ob = ZERO_XK;
            continue;
        }
        let iscale = -127.0 / max;
        for (q, &v) in ob.qs.iter_mut().zip(xb) {
            *q = ((iscale * v).round_ties_even() as i32).min(127) as i8;
        }
        for (s, chunk) in ob.s16.iter_mut().zip(ob.qs.chunks_exact(16)) {
            *s = chunk.iter().map(|&q| q as i16).sum();
        }
        for (s, pair) in ob.sub.iter_mut().zip(ob.s16.chunks_exact(2)) {
            *s = pair[0] + pair[1];
        }
        ob.d = 1.0 / iscale;
    }
}

/// The six-bit scale and min of sub-block `j` from a block's 12 packed bytes.
fn scale_min(j: usize, q: &[u8]) -> (u8, u8) {
    if j < 4 {
        (q[j] & 63, q[j + 4] & 63)
    } else {
        (
            (q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4),
            (q[j + 4] >> 4) | ((q[j] >> 6) << 4),
        )
    }
}

/// A Q4_K (`FIVE` false) or Q5_K (`FIVE` true) matrix `[n, k]` with `n % 8 == 0`, in the
/// group layout above (groups of 16 rows when the 512-bit kernels run and `n % 16 == 0`).
pub(crate) struct QKMatrix<const FIVE: bool> {
    n: usize,
    k: usize,
    gs: usize,
    data: Vec<u8>,
}

pub(crate) type Q4KMatrix = QKMatrix<false>;
pub(crate) type Q5KMatrix = QKMatrix<true>;

impl<const FIVE: bool> QKMatrix<FIVE> {
    /// Whether this layout and its kernels serve a `[n, k]` matrix on this machine.
    pub(crate) fn fits(n: usize, k: usize) -> bool {
        super::grouped_layout_fits(n, k, G)
    }

    /// Rearranges GGUF Q4_K (Q5_K) bytes of a `[n, k]` matrix.
    pub(crate) fn new(bytes: &[u8], n: usize, k: usize) -> Result<Self> {
        let name = if FIVE { "Q5_K" } else { "Q4_K" };
        let gguf = gguf_bytes(FIVE);
        let nb = super::check_gguf_bytes(name, bytes, (n, k), G, gguf)?;
        let gs = if isa() == Isa::Avx512 && n.is_multiple_of(G16) {
            G16
        } else {
            G
        };
        let gbytes = group_bytes(gs, FIVE);
        let mut data = crate::kernels::zeroed_weights::<u8>(n / gs * nb * gbytes);
        for (g, dst) in data.chunks_exact_mut(nb * gbytes).enumerate() {
            for (b, gb) in dst.chunks_exact_mut(gbytes).enumerate() {
                for r in 0..gs {
                    let src = &bytes[((g * gs + r) * nb + b) * gguf..][..gguf];
                    gb[2 * r..2 * r + 2].copy_from_slice(&src[0..2]);
                    gb[dmin_at(gs) + 2 * r..dmin_at(gs) + 2 * r + 2].copy_from_slice(&src[2..4]);
                    let packed = &src[4..16];
                    for s in 0..8 {
                        let (sc, m) = scale_min(s, packed);
                        gb[sc_at(gs) + s * gs + r] = sc;
                        let at = m_at(gs) + ((s / 2) * gs + r) * 4 + (s % 2) * 2;
                        gb[at..at + 2].copy_from_slice(&(m as i16).to_le_bytes());
                    }
                    let qs = &src[if FIVE { 48 } else { 16 }..];
                    for p in 0..4 {
                        for j in 0..8 {
                            let at = q_at(gs) + ((p * 8 + j) * gs + r) * 4;
                            gb[at..at + 4].copy_from_slice(&qs[32 * p + 4 * j..32 * p + 4 * j + 4]);
                        }
                    }
                    if FIVE {
                        for (l, &h) in src[16..48].iter().enumerate() {
                            let at = qh_at(gs) + ((l / 4) * gs + r) * 4 + l % 4;
                            gb[at] = (0..8).map(|s| ((h >> s) & 1) << high_bit(s)).sum();
                        }
                    }
                }
            }
        }
        Ok(QKMatrix { n, k, gs, data })
    }

    fn group_block(&self, g: usize, b: usize) -> &[u8] {
        let (nb, gbytes) = (self.k / QK_K, group_bytes(self.gs, FIVE));
        &self.data[(g * nb + b) * gbytes..][..gbytes]
    }

    /// Row `r` of a group block: `d`, `dmin`, the scale and min of sub-block `s`, and the
    /// 4-bit (5-bit) quant of element `l` of sub-block `s`.
    fn d_dmin(&self, gb: &[u8], r: usize) -> (f32, f32) {
        let at = dmin_at(self.gs) + 2 * r;
        (
            f16::from_le_bytes([gb[2 * r], gb[2 * r + 1]]).to_f32(),
            f16::from_le_bytes([gb[at], gb[at + 1]]).to_f32(),
        )
    }

    fn sc_m(&self, gb: &[u8], r: usize, s: usize) -> (u8, i16) {
        let gs = self.gs;
        let at = m_at(gs) + ((s / 2) * gs + r) * 4 + (s % 2) * 2;
        (
            gb[sc_at(gs) + s * gs + r],
            i16::from_le_bytes([gb[at], gb[at + 1]]),
        )
    }

    fn quant(&self, gb: &[u8], r: usize, s: usize, l: usize) -> u8 {
        let (p, j, byte) = (s / 2, l / 4, l % 4);
        let v = gb[q_at(self.gs) + ((p * 8 + j) * self.gs + r) * 4 + byte];
        let low = if s % 2 == 1 { v >> 4 } else { v & 0xF };
        if !FIVE {
            return low;
        }
        let h = gb[qh_at(self.gs) + (j * self.gs + r) * 4 + byte];
        low | (((h >> high_bit(s)) & 1) << 4)
    }

    /// Rows `start..` into `out`, one after another.
    fn dequantize_rows(&self, start: usize, out: &mut [f32]) {
        crate::kernels::rows_one_by_one(self.k, start, out, |i, dst| self.dequantize_row(i, dst));
    }

    /// Row `c` dequantized (candle's and llama.cpp's arithmetic: `d * sc * q - dmin * m`).
    fn dequantize_row(&self, c: usize, out: &mut [f32]) {
        let (g, r) = (c / self.gs, c % self.gs);
        for (b, ob) in out.chunks_exact_mut(QK_K).enumerate() {
            let gb = self.group_block(g, b);
            let (d, dmin) = self.d_dmin(gb, r);
            for s in 0..8 {
                let (sc, m) = self.sc_m(gb, r, s);
                let (d1, m1) = (d * sc as f32, dmin * m as f32);
                for l in 0..32 {
                    ob[s * 32 + l] = d1 * self.quant(gb, r, s, l) as f32 - m1;
                }
            }
        }
    }

    /// Scalar path over the group layout (same integers as the SIMD kernels): the `gs` rows
    /// of group `g` for each activation row of `x`.
    fn tile_scalar(&self, g: usize, x: &[&[XK]], out: &mut [[f32; G16]]) {
        let nb = self.k / QK_K;
        for (xr, o) in x.iter().zip(out.iter_mut()) {
            *o = [0.0; G16];
            for b in 0..nb {
                let gb = self.group_block(g, b);
                let xb = &xr[b];
                for (r, or) in o.iter_mut().enumerate().take(self.gs) {
                    let (mut sumi, mut summ) = (0i32, 0i32);
                    for s in 0..8 {
                        let dot: i32 = (0..32)
                            .map(|l| self.quant(gb, r, s, l) as i32 * xb.qs[s * 32 + l] as i32)
                            .sum();
                        let (sc, m) = self.sc_m(gb, r, s);
                        sumi += dot * sc as i32;
                        summ += m as i32 * xb.sub[s] as i32;
                    }
                    let (d, dmin) = self.d_dmin(gb, r);
                    *or += xb.d * d * sumi as f32 - xb.d * dmin * summ as f32;
                }
            }
        }
    }
}

/// `R` activation rows times the 8 rows of the group at `w`, over `nb` super-blocks.
#[cfg(target_arch = "x86_64")]
macro_rules! q4k_group {
    ($name:ident, $features:literal, $vnni:expr) => {
        /// # Safety
        /// The CPU supports the features this instance is compiled for (the caller checked at run
        /// time). `w` starts a group of `nb` super-blocks and every `x` a row of `nb` q8_K
        /// blocks.
        #[target_feature(enable = $features)]
        unsafe fn $name<const R: usize, const FIVE: bool>(
            w: *const u8,
            x: [*const XK; R],
            nb: usize,
            out: &mut [[f32; G]; R],
            stream: bool,
        ) {
            use std::arch::x86_64::*;
            let mask = _mm256_set1_epi8(0x0F);
            let bit4 = _mm256_set1_epi8(0x10);
            let ones = _mm256_set1_epi16(1);
            let mut acc = [_mm256_setzero_ps(); R];
            for b in 0..nb {
                let p = w.add(b * group_bytes(G, FIVE));
                if stream {
                    super::prefetch_ahead(p, group_bytes(G, FIVE));
                }
                let dw = _mm256_cvtph_ps(_mm_loadu_si128(p as *const __m128i));
                let dmin = _mm256_cvtph_ps(_mm_loadu_si128(p.add(dmin_at(G)) as *const __m128i));
                let mut sumi = [_mm256_setzero_si256(); R];
                for pair in 0..4 {
                    let mut lo = [_mm256_setzero_si256(); R];
                    let mut hi = [_mm256_setzero_si256(); R];
                    for j in 0..8 {
                        let raw = _mm256_loadu_si256(
                            p.add(q_at(G) + (pair * 8 + j) * 32) as *const __m256i
                        );
                        let mut wl = _mm256_and_si256(raw, mask);
                        let mut wh = _mm256_and_si256(_mm256_srli_epi16::<4>(raw), mask);
                        if FIVE {
                            // Pair `pair`'s high bits to bits 0 and 4 of each byte (the shift
                            // crosses bytes only above the bits kept).
                            let h = _mm256_srl_epi16(
                                _mm256_loadu_si256(p.add(qh_at(G) + j * 32) as *const __m256i),
                                _mm_cvtsi32_si128(pair as i32),
                            );
                            wl = _mm256_or_si256(
                                wl,
                                _mm256_and_si256(_mm256_slli_epi16::<4>(h), bit4),
                            );
                            wh = _mm256_or_si256(wh, _mm256_and_si256(h, bit4));
                        }
                        for r in 0..R {
                            let xq = (*x[r].add(b)).qs.as_ptr().add(pair * 64 + 4 * j);
                            let yl = _mm256_set1_epi32((xq as *const i32).read_unaligned());
                            let yh = _mm256_set1_epi32((xq.add(32) as *const i32).read_unaligned());
                            if $vnni {
                                lo[r] = _mm256_dpbusd_epi32(lo[r], wl, yl);
                                hi[r] = _mm256_dpbusd_epi32(hi[r], wh, yh);
                            } else {
                                lo[r] = _mm256_add_epi32(
                                    lo[r],
                                    _mm256_madd_epi16(_mm256_maddubs_epi16(wl, yl), ones),
                                );
                                hi[r] = _mm256_add_epi32(
                                    hi[r],
                                    _mm256_madd_epi16(_mm256_maddubs_epi16(wh, yh), ones),
                                );
                            }
                        }
                    }
                    let scl = _mm256_cvtepu8_epi32(_mm_loadl_epi64(
                        p.add(sc_at(G) + 2 * pair * G) as *const __m128i
                    ));
                    let sch = _mm256_cvtepu8_epi32(_mm_loadl_epi64(
                        p.add(sc_at(G) + (2 * pair + 1) * G) as *const __m128i,
                    ));
                    for r in 0..R {
                        sumi[r] = _mm256_add_epi32(sumi[r], _mm256_mullo_epi32(lo[r], scl));
                        sumi[r] = _mm256_add_epi32(sumi[r], _mm256_mullo_epi32(hi[r], sch));
                    }
                }
                for r in 0..R {
                    let xb = &*x[r].add(b);
                    let mut summ = _mm256_setzero_si256();
                    for pair in 0..4 {
                        let m = _mm256_loadu_si256(p.add(m_at(G) + pair * 32) as *const __m256i);
                        let s = _mm256_set1_epi32(
                            (xb.sub.as_ptr().add(2 * pair) as *const i32).read_unaligned(),
                        );
                        summ = _mm256_add_epi32(summ, _mm256_madd_epi16(m, s));
                    }
                    let dx = _mm256_set1_ps(xb.d);
                    acc[r] =
                        _mm256_fmadd_ps(_mm256_cvtepi32_ps(sumi[r]), _mm256_mul_ps(dw, dx), acc[r]);
                    acc[r] =
                        _mm256_fnmadd_ps(_mm256_cvtepi32_ps(summ), _mm256_mul_ps(dmin, dx), acc[r]);
                }
            }
            for r in 0..R {
                _mm256_storeu_ps(out[r].as_mut_ptr(), acc[r]);
            }
        }
    };
}

#[cfg(target_arch = "x86_64")]
q4k_group!(q4k_avx2, "avx2,fma,f16c", false);
#[cfg(target_arch = "x86_64")]
q4k_group!(q4k_vnni, "avx2,fma,f16c,avx512vnni,avx512vl", true);

/// [`q4k_vnni`] on 512-bit vectors over groups of 16 rows.
#[cfg(target_arch = "x86_64")]
/// # Safety
/// The CPU supports `avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c` (the caller checked at
/// run time). `w` starts a group of `nb` super-blocks and every `x` a row of `nb` q8_K blocks.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
unsafe fn q4k_avx512<const R: usize, const FIVE: bool>(
    w: *const u8,
    x: [*const XK; R],
    nb: usize,
    out: &mut [[f32; G16]; R],
    stream: bool,
) {
    use std::arch::x86_64::*;
    let mask = _mm512_set1_epi8(0x0F);
    let bit4 = _mm512_set1_epi8(0x10);
    let mut acc = [_mm512_setzero_ps(); R];
    for b in 0..nb {
        let p = w.add(b * group_bytes(G16, FIVE));
        if stream {
            super::prefetch_ahead(p, group_bytes(G16, FIVE));
        }
        let dw = _mm512_cvtph_ps(_mm256_loadu_si256(p as *const __m256i));
        let dmin = _mm512_cvtph_ps(_mm256_loadu_si256(p.add(dmin_at(G16)) as *const __m256i));
        let mut sumi = [_mm512_setzero_si512(); R];
        for pair in 0..4 {
            let mut lo = [_mm512_setzero_si512(); R];
            let mut hi = [_mm512_setzero_si512(); R];
            for j in 0..8 {
                let raw = _mm512_loadu_si512(p.add(q_at(G16) + (pair * 8 + j) * 64) as *const _);
                let mut wl = _mm512_and_si512(raw, mask);
                let mut wh = _mm512_and_si512(_mm512_srli_epi16::<4>(raw), mask);
                if FIVE {
                    let h = _mm512_srl_epi16(
                        _mm512_loadu_si512(p.add(qh_at(G16) + j * 64) as *const _),
                        _mm_cvtsi32_si128(pair as i32),
                    );
                    wl = _mm512_or_si512(wl, _mm512_and_si512(_mm512_slli_epi16::<4>(h), bit4));
                    wh = _mm512_or_si512(wh, _mm512_and_si512(h, bit4));
                }
                for r in 0..R {
                    let xq = (*x[r].add(b)).qs.as_ptr().add(pair * 64 + 4 * j);
                    let yl = _mm512_set1_epi32((xq as *const i32).read_unaligned());
                    let yh = _mm512_set1_epi32((xq.add(32) as *const i32).read_unaligned());
                    lo[r] = _mm512_dpbusd_epi32(lo[r], wl, yl);
                    hi[r] = _mm512_dpbusd_epi32(hi[r], wh, yh);
                }
            }
            let scl = _mm512_cvtepu8_epi32(_mm_loadu_si128(
                p.add(sc_at(G16) + 2 * pair * G16) as *const __m128i
            ));
            let sch = _mm512_cvtepu8_epi32(_mm_loadu_si128(
                p.add(sc_at(G16) + (2 * pair + 1) * G16) as *const __m128i,
            ));
            for r in 0..R {
                sumi[r] = _mm512_add_epi32(sumi[r], _mm512_mullo_epi32(lo[r], scl));
                sumi[r] = _mm512_add_epi32(sumi[r], _mm512_mullo_epi32(hi[r], sch));
            }
        }
        for r in 0..R {
            let xb = &*x[r].add(b);
            let mut summ = _mm512_setzero_si512();
            for pair in 0..4 {
                let m = _mm512_loadu_si512(p.add(m_at(G16) + pair * 64) as *const _);
                let s = _mm512_set1_epi32(
                    (xb.sub.as_ptr().add(2 * pair) as *const i32).read_unaligned(),
                );
                summ = _mm512_add_epi32(summ, _mm512_madd_epi16(m, s));
            }
            let dx = _mm512_set1_ps(xb.d);
            acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sumi[r]), _mm512_mul_ps(dw, dx), acc[r]);
            acc[r] = _mm512_fnmadd_ps(_mm512_cvtepi32_ps(summ), _mm512_mul_ps(dmin, dx), acc[r]);
        }
    }
    for r in 0..R {
        _mm512_storeu_ps(out[r].as_mut_ptr(), acc[r]);
    }
}

/// A tile of the k-quant group kernels: group `g`, activation rows `rows` (their q8_K blocks
/// as `x`, padded by repeating the last row; all rows' blocks as `xq`), results into `out`.
/// A group tile: group, activation rows, their q8_K rows, all q8_K rows, the output, and
/// whether the weights stream from memory (at most two row tiles: decode, a small batch, a
/// verification; the second tile rereads the group from cache), so the kernel asks for the
/// lines ahead.
pub(super) type Tile<'a> = dyn Fn(usize, std::ops::Range<usize>, [*const XK; TILE_R], &[XK], &mut [[f32; G16]; TILE_R], bool)
    + Sync
    + 'a;

/// The activation rows `rows` of `xq` (`nb` blocks each) as slices, for the scalar paths.
pub(super) fn row_slices(xq: &[XK], rows: std::ops::Range<usize>, nb: usize) -> Vec<&[XK]> {
    rows.map(|r| &xq[r * nb..(r + 1) * nb]).collect()
}

/// The driver shared by the k-quant group kernels: quantizes the rows of `x` to q8_K, runs
/// `tile` over tiles of up to [`TILE_R`] activation rows x one group of `gs` weight rows on
/// the pool (group-major, so a worker's consecutive tiles reuse the group from cache), and
/// writes `xs @ W^T` for `m` rows of a `[n, k]` matrix through `put`.
pub(super) fn group_matmul(
    xs: &[f32],
    m: usize,
    (n, k): (usize, usize),
    gs: usize,
    put: DstWriter<'_>,
    tile: &Tile<'_>,
) {
    let nb = k / QK_K;
    let mut xq = vec![ZERO_XK; m * nb];
    if nb > 0 {
        crate::pool::for_each_chunk_mut(&mut xq, nb, &|r, out| {
            quantize_q8k(&xs[r * k..(r + 1) * k], out)
        });
    }
    let row_tiles = m.div_ceil(TILE_R);
    let work = |item: usize, put: &DstWriter<'_>| {
        let (g, rt) = (item / row_tiles, item % row_tiles);
        let rows = rt * TILE_R..m.min((rt + 1) * TILE_R);
        let x: [*const XK; TILE_R] = std::array::from_fn(|r| {
            let row = (rows.start + r).min(rows.end - 1);
            xq[row * nb..(row + 1) * nb].as_ptr()
        });
        let mut out = [[0f32; G16]; TILE_R];
        tile(g, rows.clone(), x, &xq, &mut out, row_tiles <= 2);
        for (r, row) in rows.enumerate() {
            put.put(row, g * gs, &out[r][..gs]);
        }
    };
    run_items(row_tiles * (n / gs), put, &work);
}

impl<const FIVE: bool> QKMatrix<FIVE> {
    /// No training panels: rows are dequantized whole.
    fn has_panels(&self) -> bool {
        false
    }
    fn panel_t(&self, _: std::ops::Range<usize>, _: std::ops::Range<usize>, _: &mut [f32]) {}
}

our_weight_matrix!(Q4KMatrix, |_| candle_core::quantized::GgmlDType::Q4K, true);
our_weight_matrix!(Q5KMatrix, |_| candle_core::quantized::GgmlDType::Q5K, true);

impl<const FIVE: bool> QKMatrix<FIVE> {
    /// `xs @ W^T` for `m` rows of `k` values, every output written through `put`.
    fn compute(&self, xs: &[f32], m: usize, put: DstWriter<'_>) {
        let (isa, gs) = (isa(), self.gs);
        let nb = self.k / QK_K;
        group_matmul(
            xs,
            m,
            (self.n, self.k),
            gs,
            put,
            &|g, rows, x, xq, out, stream| match isa {
                #[cfg(target_arch = "x86_64")]
                Isa::Avx2 | Isa::Vnni | Isa::Avx512 => {
                    let w = self.group_block(g, 0).as_ptr();
                    // SAFETY: the CPU has the features (checked at run time: 16-row groups only
                    // with AVX-512); `w` starts the group's `nb` super-blocks and every `x` a row
                    // of `nb` blocks.
                    // As many rows as the tile has, up to TILE_R (each row's sums are its own
                    // in every shape: the same bits whatever the tile).
                    unsafe {
                        let vnni = isa.vnni();
                        macro_rules! tile {
                            ($r:expr) => {{
                                let x = std::array::from_fn(|r| x[r]);
                                if gs == G16 {
                                    let mut part = [[0f32; G16]; $r];
                                    q4k_avx512::<$r, FIVE>(w, x, nb, &mut part, stream);
                                    out[..$r].copy_from_slice(&part);
                                } else {
                                    let mut part = [[0f32; G]; $r];
                                    if vnni {
                                        q4k_vnni::<$r, FIVE>(w, x, nb, &mut part, stream)
                                    } else {
                                        q4k_avx2::<$r, FIVE>(w, x, nb, &mut part, stream)
                                    }
                                    for (o, p) in out.iter_mut().zip(&part) {
                                        o[..G].copy_from_slice(p);
                                    }
                                }
                            }};
                        }
                        match rows.len() {
                            1 => tile!(1),
                            2 => tile!(2),
                            _ => tile!(TILE_R),
                        }
                    }
                }
                _ => {
                    let n = rows.len();
                    self.tile_scalar(g, &row_slices(xq, rows, nb), &mut out[..n])
                }
            },
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::values;
    use candle_core::quantized::GgmlDType;

    /// Rows equal candle's dequantization; products equal the scalar path over the same
    /// integers and agree with candle's Q4_K matmul.
    #[test]
    fn q4k_matrix_matches_scalar_and_candle() {
        crate::kernels::check_kquant(
            GgmlDType::Q4K,
            3,
            |b, n, k| Q4KMatrix::new(b, n, k).unwrap(),
            |m| m.gs,
            |m, g, x, out| m.tile_scalar(g, x, out),
        );
    }

    /// The same for Q5_K (the Q4_K layout with a high-bit plane).
    #[test]
    fn q5k_matrix_matches_scalar_and_candle() {
        crate::kernels::check_kquant(
            GgmlDType::Q5K,
            4,
            |b, n, k| Q5KMatrix::new(b, n, k).unwrap(),
            |m| m.gs,
            |m, g, x, out| m.tile_scalar(g, x, out),
        );
    }

    #[test]
    fn q8k_quantization_follows_llama_cpp() {
        let mut x = values(512, 5);
        x[7] = -3.0; // the extreme of a block maps to -127 whatever its sign (iscale = -127/max)
        x[300] = 2.0;
        x[301] = -2.0; // a tie in magnitude: the first one wins
        let mut out = [ZERO_XK; 2];
        quantize_q8k(&x, &mut out);
        assert_eq!(out[0].qs[7], -127);
        assert_eq!(out[1].qs[300 - 256], -127);
        assert_eq!(out[1].qs[301 - 256], 127);
        for (b, ob) in out.iter().enumerate() {
            for (s, &sum) in ob.sub.iter().enumerate() {
                let want: i16 = ob.qs[s * 32..(s + 1) * 32].iter().map(|&q| q as i16).sum();
                assert_eq!(sum, want, "block {b} sub {s}");
            }
            for (s, &sum) in ob.s16.iter().enumerate() {
                let want: i16 = ob.qs[s * 16..(s + 1) * 16].iter().map(|&q| q as i16).sum();
                assert_eq!(sum, want, "block {b} s16 {s}");
            }
            for (i, &q) in ob.qs.iter().enumerate() {
                let v = x[b * 256 + i] / ob.d;
                assert!((v - q as f32).abs() <= 0.5 + 1e-3, "{v} vs {q}");
            }
        }
        let mut z = [ZERO_XK; 1];
        quantize_q8k(&[0.0; 256], &mut z);
        assert_eq!(z[0].d, 0.0);
    }
}
