//! CPU kernels where candle has none fast enough: the Q4_1 matrix product (candle 0.11's Q4_1
//! dot product is a scalar loop). Activations are quantized to 8-bit blocks as llama.cpp does
//! (`q8_1`: per-32 scale, rounding to nearest even, scale and sum kept at f16 precision), and
//! each weight block contributes `d_w * d_x * sum(q_w * q_x) + m_w * s_x`.
//!
//! The x86-64 AVX2/FMA/F16C path is picked at run time (`is_x86_feature_detected!`), so a
//! portable build still uses it; every other machine runs the scalar path, which computes the
//! same integer sums. Work is spread over candle's persistent thread pool.

use candle_core::{Device, Tensor};
use half::f16;

use crate::error::{Error, Result};

const QK: usize = 32;
/// Bytes of one Q4_1 block: f16 scale, f16 minimum, 16 bytes of nibbles.
const Q4_1_BYTES: usize = 20;

/// One activation block: scale, scale times the sum of the quants, 32 quants.
#[derive(Clone, Copy)]
#[repr(C)]
struct XBlock {
    d: f32,
    s: f32,
    qs: [i8; QK],
}

/// A Q4_1 weight matrix `[n, k]` (rows are output features), stored as GGUF blocks.
#[derive(Debug)]
pub(crate) struct Q4_1Matrix {
    n: usize,
    k: usize,
    data: Vec<u8>,
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Isa {
    Scalar,
    #[cfg(target_arch = "x86_64")]
    Avx2,
}

fn isa() -> Isa {
    #[cfg(target_arch = "x86_64")]
    {
        static ISA: std::sync::OnceLock<Isa> = std::sync::OnceLock::new();
        *ISA.get_or_init(|| {
            if std::env::var_os("LLAMA_CORE_SCALAR").is_none()
                && is_x86_feature_detected!("avx2")
                && is_x86_feature_detected!("fma")
                && is_x86_feature_detected!("f16c")
            {
                Isa::Avx2
            } else {
                Isa::Scalar
            }
        })
    }
    #[cfg(not(target_arch = "x86_64"))]
    Isa::Scalar
}

/// llama.cpp's activation quantization for q8_1 blocks.
fn quantize_row_q8_1(x: &[f32], out: &mut [XBlock]) {
    for (xb, ob) in x.chunks_exact(QK).zip(out.iter_mut()) {
        let amax = xb.iter().fold(0f32, |m, v| m.max(v.abs()));
        let d = amax / 127.0;
        let id = if amax != 0.0 { 127.0 / amax } else { 0.0 };
        let mut sum = 0i32;
        for (q, &v) in ob.qs.iter_mut().zip(xb) {
            let r = (v * id).round_ties_even() as i32;
            *q = r as i8;
            sum += r;
        }
        ob.d = f16::from_f32(d).to_f32();
        ob.s = f16::from_f32(d * sum as f32).to_f32();
    }
}

fn dot_scalar(w: &[u8], x: &[XBlock]) -> f32 {
    let mut acc = 0f32;
    let mut summs = 0f32;
    for (wb, xb) in w.chunks_exact(Q4_1_BYTES).zip(x) {
        let d = f16::from_le_bytes([wb[0], wb[1]]).to_f32();
        let m = f16::from_le_bytes([wb[2], wb[3]]).to_f32();
        let qs = &wb[4..20];
        let mut sumi = 0i32;
        let (xlo, xhi) = xb.qs.split_at(QK / 2);
        for ((&q, &a), &b) in qs.iter().zip(xlo).zip(xhi) {
            sumi += (q & 0x0F) as i32 * a as i32 + (q >> 4) as i32 * b as i32;
        }
        acc += d * xb.d * sumi as f32;
        summs += m * xb.s;
    }
    acc + summs
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn dot4_avx2(w: [&[u8]; 4], x: &[XBlock], out: &mut [f32; 4]) {
    use std::arch::x86_64::*;
    let nb = x.len();
    let mask = _mm_set1_epi8(0x0F);
    let ones = _mm256_set1_epi16(1);
    let mut acc = [_mm256_setzero_ps(); 4];
    let mut summs = [0f32; 4];
    for b in 0..nb {
        let xb = x.get_unchecked(b);
        let y = _mm256_loadu_si256(xb.qs.as_ptr() as *const __m256i);
        for c in 0..4 {
            let p = w[c].as_ptr().add(b * Q4_1_BYTES);
            let dm = _mm_cvtph_ps(_mm_cvtsi32_si128((p as *const i32).read_unaligned()));
            let d = _mm_cvtss_f32(dm);
            let m = _mm_cvtss_f32(_mm_shuffle_ps::<1>(dm, dm));
            let q = _mm_loadu_si128(p.add(4) as *const __m128i);
            let lo = _mm_and_si128(q, mask);
            let hi = _mm_and_si128(_mm_srli_epi16::<4>(q), mask);
            let wq = _mm256_set_m128i(hi, lo);
            let p16 = _mm256_maddubs_epi16(wq, y);
            let p32 = _mm256_madd_epi16(p16, ones);
            acc[c] = _mm256_fmadd_ps(_mm256_set1_ps(d * xb.d), _mm256_cvtepi32_ps(p32), acc[c]);
            summs[c] += m * xb.s;
        }
    }
    for c in 0..4 {
        let v = acc[c];
        let s4 = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
        let s2 = _mm_add_ps(s4, _mm_movehl_ps(s4, s4));
        let s1 = _mm_add_ss(s2, _mm_shuffle_ps::<1>(s2, s2));
        out[c] = _mm_cvtss_f32(s1) + summs[c];
    }
}

impl Q4_1Matrix {
    /// Takes the GGUF bytes of a `[n, k]` Q4_1 tensor.
    pub(crate) fn new(data: Vec<u8>, n: usize, k: usize) -> Result<Self> {
        if k % QK != 0 || data.len() != n * k / QK * Q4_1_BYTES {
            return Err(Error::InvalidArgument(format!(
                "Q4_1 matrix [{n}, {k}] cannot hold {} bytes",
                data.len()
            )));
        }
        Ok(Q4_1Matrix { n, k, data })
    }

    fn row(&self, j: usize) -> &[u8] {
        let rb = self.k / QK * Q4_1_BYTES;
        &self.data[j * rb..(j + 1) * rb]
    }

    /// `x @ W^T` for `x` of shape `[..., k]`.
    pub(crate) fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let dims = x.dims().to_vec();
        let k = *dims.last().unwrap_or(&0);
        if k != self.k {
            return Err(Error::InvalidArgument(format!(
                "matmul: input width {k} != {}",
                self.k
            )));
        }
        let m = x.elem_count() / k.max(1);
        let xs = x.flatten_all()?.to_vec1::<f32>()?;
        let nb = k / QK;
        let mut xq = vec![
            XBlock {
                d: 0.0,
                s: 0.0,
                qs: [0; QK]
            };
            m * nb
        ];
        for (row, out) in xs.chunks_exact(k).zip(xq.chunks_exact_mut(nb)) {
            quantize_row_q8_1(row, out);
        }
        let n = self.n;
        let mut dst = vec![0f32; m * n];
        let dst_ptr = dst.as_mut_ptr() as usize;
        let isa = isa();
        // Work items: (tile of up to 8 activation rows, group of 4 weight rows); each dst
        // element is written by exactly one item.
        const TILE: usize = 8;
        let groups = n.div_ceil(4);
        let tiles = m.div_ceil(TILE);
        let work = |item: usize| {
            let (t, g) = (item / groups, item % groups);
            let c0 = g * 4;
            let cols = (n - c0).min(4);
            for r in t * TILE..(m.min((t + 1) * TILE)) {
                let xr = &xq[r * nb..(r + 1) * nb];
                let mut out = [0f32; 4];
                match isa {
                    #[cfg(target_arch = "x86_64")]
                    Isa::Avx2 if cols == 4 => {
                        let w = [
                            self.row(c0),
                            self.row(c0 + 1),
                            self.row(c0 + 2),
                            self.row(c0 + 3),
                        ];
                        // SAFETY: the CPU has avx2, fma and f16c (checked once at run time);
                        // every row holds `nb` blocks.
                        unsafe { dot4_avx2(w, xr, &mut out) };
                    }
                    _ => {
                        for (c, o) in out.iter_mut().enumerate().take(cols) {
                            *o = dot_scalar(self.row(c0 + c), xr);
                        }
                    }
                }
                for (c, &v) in out.iter().enumerate().take(cols) {
                    // SAFETY: (r, c0 + c) is inside dst and written by this item only.
                    unsafe { *(dst_ptr as *mut f32).add(r * n + c0 + c) = v };
                }
            }
        };
        let items = tiles * groups;
        if items < 8 {
            (0..items).for_each(work);
        } else {
            candle_core::utils::barrier_pool()
                .execute_chunked(items, |range| range.for_each(&work));
        }
        let mut out_dims = dims;
        *out_dims.last_mut().expect("non-empty") = n;
        Ok(Tensor::from_vec(dst, out_dims, &Device::Cpu)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::quantized::{GgmlDType, QTensor};

    fn values(n: usize, seed: u32) -> Vec<f32> {
        let mut s = seed | 1;
        (0..n)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 17;
                s ^= s << 5;
                (s as f32 / u32::MAX as f32) * 2.0 - 1.0
            })
            .collect()
    }

    /// The SIMD path and the scalar path give the same products (up to float summation
    /// order), and both match a dequantized f64 product of the quantized operands.
    #[test]
    fn q4_1_matmul_matches_scalar_and_reference() {
        let (n, k, m) = (37, 96, 5);
        let w = values(n * k, 7);
        let q = QTensor::quantize(
            &Tensor::from_vec(w, (n, k), &Device::Cpu).unwrap(),
            GgmlDType::Q4_1,
        )
        .unwrap();
        let wd: Vec<f32> = q
            .dequantize(&Device::Cpu)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let mat = Q4_1Matrix::new(q.data().unwrap().into_owned(), n, k).unwrap();
        let x = values(m * k, 11);
        let y: Vec<f32> = mat
            .forward(&Tensor::from_vec(x.clone(), (m, k), &Device::Cpu).unwrap())
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let nb = k / QK;
        for r in 0..m {
            let mut xq = vec![
                XBlock {
                    d: 0.0,
                    s: 0.0,
                    qs: [0; QK]
                };
                nb
            ];
            quantize_row_q8_1(&x[r * k..(r + 1) * k], &mut xq);
            for c in 0..n {
                let s = dot_scalar(mat.row(c), &xq);
                assert!((y[r * n + c] - s).abs() < 1e-4, "simd vs scalar at {r},{c}");
                // Against the dequantized operands in f64.
                let mut want = 0f64;
                for (b, xb) in xq.iter().enumerate() {
                    for i in 0..QK {
                        want += wd[c * k + b * QK + i] as f64 * (xb.d * xb.qs[i] as f32) as f64;
                    }
                }
                // s_x rounds through f16: allow its relative error on the minimum term.
                assert!((s as f64 - want).abs() < 2e-2, "{r},{c}: {s} vs {want}");
            }
        }
    }
}
