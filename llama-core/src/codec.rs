//! GGUF block encoding of dense f32 rows and back ([`quantize_rows`], [`dequantize`]), on the
//! thread pool: used by quantize-at-load and by `quantize_model`.

use candle_core::quantized::{ggml_file::qtensor_from_ggml, GgmlDType};
use candle_core::{Device, Tensor};

use crate::error::{Error, Result};
use crate::types::FileType;

/// The pool of `threads` threads, or with `0` the running call's pool (the model's at load;
/// one thread per physical core otherwise).
pub(crate) fn pool_of(threads: usize) -> Result<&'static crate::pool::Pool> {
    match threads {
        0 => Ok(crate::pool::pool()),
        n => crate::pool::Pool::with_threads(n),
    }
}

/// Runs `f` over `items` on `pool`, results in order.
pub(crate) fn par_map<T: Sync, R: Send>(
    items: &[T],
    pool: &crate::pool::Pool,
    f: impl Fn(&T) -> R + Sync,
) -> Result<Vec<R>> {
    let slots: Vec<std::sync::Mutex<Option<R>>> =
        items.iter().map(|_| std::sync::Mutex::new(None)).collect();
    pool.run(items.len(), &|range| {
        for i in range {
            let r = f(&items[i]);
            *slots[i].lock().unwrap_or_else(|e| e.into_inner()) = Some(r);
        }
    });
    slots
        .into_iter()
        .map(|m| {
            m.into_inner()
                .unwrap_or_else(|e| e.into_inner())
                .ok_or_else(|| Error::InvalidArgument("a parallel item did not run".into()))
        })
        .collect()
}

/// Quantizes a dense row-major matrix `[rows, row_len]` (f32 values) to `ty`, splitting the rows
/// over the pool of `threads` threads (`0`: the running call's pool, one thread per physical
/// core by default). Returns the raw GGUF block bytes (identical for any thread count).
/// `row_len` must be a multiple of the type's block size.
pub fn quantize_rows(
    values: &[f32],
    row_len: usize,
    ty: FileType,
    threads: usize,
) -> Result<Vec<u8>> {
    let block = ty.ggml().block_size();
    if row_len == 0 || !row_len.is_multiple_of(block) || !values.len().is_multiple_of(row_len) {
        return Err(Error::InvalidArgument(format!(
            "cannot quantize {} values in rows of {row_len} to {ty} (blocks of {block})",
            values.len()
        )));
    }
    let rows = values.len() / row_len;
    match ty {
        FileType::F32 => return Ok(values.iter().flat_map(|x| x.to_le_bytes()).collect()),
        FileType::F16 => {
            return Ok(values
                .iter()
                .flat_map(|x| half::f16::from_f32(*x).to_le_bytes())
                .collect())
        }
        FileType::Quant(_) => {}
    }
    // Chunks of whole rows, a few per thread so uneven progress evens out.
    let pool = pool_of(threads)?;
    let per_chunk = rows.div_ceil(pool.threads() * 4).max(1);
    let chunks: Vec<(usize, usize)> = (0..rows)
        .step_by(per_chunk)
        .map(|r| (r, (r + per_chunk).min(rows)))
        .collect();
    let parts = par_map(&chunks, pool, |&(a, b)| -> Result<Vec<u8>> {
        let t = Tensor::from_slice(
            &values[a * row_len..b * row_len],
            (b - a, row_len),
            &Device::Cpu,
        )?;
        let q = candle_core::quantized::QTensor::quantize(&t, ty.ggml())?;
        Ok(q.data()?.into_owned())
    })?;
    let mut out = Vec::new();
    for p in parts {
        out.extend_from_slice(&p?);
    }
    Ok(out)
}

/// Dequantizes GGUF block bytes of type `ty` holding `elems` values.
pub fn dequantize(bytes: &[u8], ty: FileType, elems: usize) -> Result<Vec<f32>> {
    let g = ty.ggml();
    if !elems.is_multiple_of(g.block_size()) || bytes.len() != tensor_bytes(g, elems) {
        return Err(Error::InvalidArgument(format!(
            "{} bytes do not hold {elems} values of {ty}",
            bytes.len()
        )));
    }
    let store = crate::matrix::aligned(bytes);
    let q = qtensor_from_ggml(
        g,
        crate::matrix::as_bytes(&store, bytes.len()),
        vec![elems],
        &Device::Cpu,
    )?;
    Ok(q.dequantize(&Device::Cpu)?.to_vec1()?)
}

/// Bytes a tensor of `elems` values takes in `dtype`.
pub(crate) fn tensor_bytes(dtype: GgmlDType, elems: usize) -> usize {
    elems / dtype.block_size() * dtype.type_size()
}
