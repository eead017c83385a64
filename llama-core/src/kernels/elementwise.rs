//! Element-wise operations of the forward pass on the pool: RMS norm, residual adds, SwiGLU.

use super::*;

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
pub(crate) fn chunks_on_pool(
    x: &mut [f32],
    f: &(dyn Fn(std::ops::Range<usize>, &mut [f32]) + Sync),
) {
    const CHUNK: usize = 4096;
    let n = x.len();
    if n <= CHUNK {
        f(0..n, x);
        return;
    }
    for_each_chunk_mut(x, CHUNK, &|c, xc| f(c * CHUNK..c * CHUNK + xc.len(), xc));
}

/// `f(src row, dst row)` for each row of `d` values, on the pool when there are many rows.
pub(crate) fn rows_on_pool(
    src: &[f32],
    dst: &mut [f32],
    d: usize,
    f: &(dyn Fn(&[f32], &mut [f32]) + Sync),
) {
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
pub(crate) fn silu_mul(g: &[f32], u: &[f32], o: &mut [f32], simd: bool) {
    let mut i = 0;
    #[cfg(target_arch = "x86_64")]
    if simd {
        // SAFETY: avx2 and fma were detected at run time; every access is in bounds.
        unsafe {
            use std::arch::x86_64::*;
            let one = _mm256_set1_ps(1.0);
            while i + 8 <= o.len() {
                let gv = _mm256_loadu_ps(g.as_ptr().add(i));
                let e = crate::kernels::simd::exp8(_mm256_sub_ps(_mm256_setzero_ps(), gv));
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
