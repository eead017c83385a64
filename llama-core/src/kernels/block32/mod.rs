//! The 32-value block formats Q4_0, Q4_1, Q5_0, Q5_1 and Q8_0: the formats, the 8-bit
//! activation blocks, the interleaved row-group layouts, [`BlockMatrix`] and its scalar path.
//! The SIMD kernels are in `avx2` (256-bit, with or without VNNI) and `avx512`.
//!
//! Why our own kernels: candle
//! 0.11's Q4_1 dot product is a scalar loop, and its prompt-processing path re-unpacks every
//! weight block for every activation row.
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

#[cfg(target_arch = "x86_64")]
mod avx2;
#[cfg(target_arch = "x86_64")]
mod avx512;
#[cfg(target_arch = "x86_64")]
pub(crate) use {avx2::*, avx512::*};

use super::*;
use half::f16;

pub(crate) const QK: usize = 32;

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
pub(crate) struct XBlock {
    /// Scale (f16 precision).
    pub(crate) d: f32,
    /// `d * sum(qs)` at f16 precision (ggml's q8_1 `s`), for Q4_1.
    pub(crate) s: f32,
    /// `sum(qs)`, for the offset formats.
    pub(crate) sum: i32,
    _pad: f32,
    pub(crate) qs: [i8; QK],
}

pub(crate) const ZERO_X: XBlock = XBlock {
    d: 0.0,
    s: 0.0,
    sum: 0,
    _pad: 0.0,
    qs: [0; QK],
};

/// llama.cpp's activation quantization (q8_0 / q8_1 blocks).
pub(crate) fn quantize_row(x: &[f32], out: &mut [XBlock]) {
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

pub(crate) fn quantize_row_scalar(x: &[f32], out: &mut [XBlock]) {
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

pub(crate) fn f16_at(p: &[u8], off: usize) -> f32 {
    f16::from_le_bytes([p[off], p[off + 1]]).to_f32()
}

/// Scalar dot of one weight row with one activation row (exact integer block sums).
pub(crate) fn dot_scalar(fmt: BlockFmt, w: &[u8], x: &[XBlock]) -> f32 {
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
pub(crate) const G: usize = 8;

/// Rows per interleaved group for the 512-bit kernels.
pub(crate) const G16: usize = 16;

/// Byte offsets inside a block of a group of `gs` rows: the fifth-bit words (Q5), then the
/// quants.
pub(crate) const fn group_qh_at(fmt: BlockFmt, gs: usize) -> usize {
    if fmt.has_min() {
        4 * gs
    } else {
        2 * gs
    }
}

pub(crate) const fn has_qh(fmt: BlockFmt) -> bool {
    matches!(fmt, BlockFmt::Q5_0 | BlockFmt::Q5_1)
}

pub(crate) const fn group_quants_at(fmt: BlockFmt, gs: usize) -> usize {
    group_qh_at(fmt, gs) + if has_qh(fmt) { 4 * gs } else { 0 }
}

/// A Q5 block's fifth bits rearranged so that byte `p` serves quant piece `p`: its low four
/// bits are the fifth bits of elements `4p..4p+4` (the low nibbles of the piece), its high
/// four those of elements `16+4p..16+4p+4` (the high nibbles).
pub(crate) fn qh_to_pieces(qh: u32) -> u32 {
    (0..4).fold(0u32, |acc, p| {
        let lo = (qh >> (4 * p)) & 0xF;
        let hi = (qh >> (16 + 4 * p)) & 0xF;
        acc | ((lo | (hi << 4)) << (8 * p))
    })
}

pub(crate) fn qh_from_pieces(v: u32) -> u32 {
    (0..4).fold(0u32, |acc, p| {
        let b = (v >> (8 * p)) & 0xFF;
        acc | ((b & 0xF) << (4 * p)) | ((b >> 4) << (16 + 4 * p))
    })
}

/// Bytes before the quants in a GGUF block (scale, minimum, fifth bits).
pub(crate) const fn head_bytes(fmt: BlockFmt) -> usize {
    group_quants_at(fmt, 1)
}

/// Bytes copied out of a source between calls to its `release`.
pub(crate) const RELEASE_CHUNK: usize = 1 << 20;

/// GGUF rows (`k` values each, `n % gs == 0`) rearranged into interleaved groups of `gs`;
/// `release(start, len)` is called for each consumed range of `data`.
pub(crate) fn interleave(
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
    let mut out = crate::kernels::zeroed_weights::<u8>(data.len());
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
pub(crate) const F_Q4_0: u8 = 0;
pub(crate) const F_Q4_1: u8 = 1;
pub(crate) const F_Q5_0: u8 = 2;
pub(crate) const F_Q5_1: u8 = 3;
pub(crate) const F_Q8_0: u8 = 4;

pub(crate) const fn fmt_of(f: u8) -> BlockFmt {
    match f {
        F_Q4_0 => BlockFmt::Q4_0,
        F_Q4_1 => BlockFmt::Q4_1,
        F_Q5_0 => BlockFmt::Q5_0,
        F_Q5_1 => BlockFmt::Q5_1,
        _ => BlockFmt::Q8_0,
    }
}

/// Quantized activations of `m` rows of `k` values, rows spread over the pool.
pub(crate) fn quantize_rows_parallel(xs: &[f32], m: usize, k: usize) -> Vec<XBlock> {
    let nb = k / QK;
    let mut xq = vec![ZERO_X; m * nb];
    if nb > 0 {
        for_each_chunk_mut(&mut xq, nb, &|r, out| {
            quantize_row(&xs[r * k..(r + 1) * k], out)
        });
    }
    xq
}

/// A weight matrix `[n, k]` (rows are output features) in one of the block formats, stored as
/// GGUF blocks, or as interleaved groups of 8 rows (see [`G`]).
#[derive(Debug)]
pub(crate) struct BlockMatrix {
    fmt: BlockFmt,
    n: usize,
    k: usize,
    /// Rows per interleaved group: 16 (512-bit kernels), 8, or 0 for GGUF rows.
    pub(crate) group: usize,
    data: Vec<u8>,
}

/// Activation rows per tile in prompt processing, and weight rows per tile.
pub(crate) const TILE_R: usize = 4;
pub(crate) const TILE_C: usize = 2;
/// Weight rows per work item in decode.
pub(crate) const DECODE_C: usize = 4;
/// Activation rows per tile over interleaved groups: 8 with the 512-bit kernels (16-row
/// groups), 6 with the 256-bit ones.
pub(crate) const GROUP_R: usize = 8;
pub(crate) const GROUP_R8: usize = 6;
/// Independent integer-sum chains per row in a group tile of `r` rows: two hide the `dpbusd`
/// latency in a short tile; a tall one has a chain per row already, and one chain each leaves
/// registers for the rows. Integer sums are exact, so the chains never change a result.
pub(crate) const fn chains(r: usize) -> usize {
    if r <= 4 {
        2
    } else {
        1
    }
}

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
            let mut out = crate::kernels::weight_buffer(data.len());
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
    pub(crate) fn gguf_row(&self, c: usize) -> Vec<u8> {
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
        let mut data = crate::kernels::weight_buffer(parts.iter().map(|p| p.data.len()).sum());
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
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 | Isa::Vnni | Isa::Avx512 => {
                // A partial tile, one dot at a time through the same kernel: each dot has its
                // own accumulator in every tile shape, so a row gets the same bits whatever
                // tile it falls in (a decode step, a verification, a prompt's last rows).
                for (r, row) in rows.clone().enumerate() {
                    for (c, col) in cols.clone().enumerate() {
                        let mut one = [[0f32; 1]; 1];
                        let w = [self.row(col).as_ptr()];
                        let x = [xq[row * nb..].as_ptr()];
                        // SAFETY: as above.
                        unsafe {
                            if isa.vnni() {
                                tile_vnni::<1, 1>(self.fmt, w, x, nb, &mut one)
                            } else {
                                tile_avx2::<1, 1>(self.fmt, w, x, nb, &mut one)
                            }
                        }
                        out[r][c] = one[0][0];
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

    /// Rows `start..` into `out`, one after another.
    fn dequantize_rows(&self, start: usize, out: &mut [f32]) {
        rows_one_by_one(self.k, start, out, |i, dst| self.dequantize_row(i, dst));
    }

    /// Row `id` dequantized into `dst` (`k` values).
    fn dequantize_row(&self, id: usize, dst: &mut [f32]) {
        if self.group > 0 && !has_qh(self.fmt) {
            return self.dequantize_grouped_row(id, dst);
        }
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

    /// [`BlockMatrix::dequantize_row`] read straight from the interleaved groups (Q4_0, Q4_1,
    /// Q8_0: the formats without fifth bits), with the same arithmetic: no GGUF block is put
    /// back together first (training dequantizes every weight row once or twice a step).
    fn dequantize_grouped_row(&self, c: usize, dst: &mut [f32]) {
        let (bytes, nb, gs) = (self.fmt.bytes(), self.k / QK, self.group);
        #[cfg(target_arch = "x86_64")]
        if isa() == Isa::Avx512 {
            let (g, i) = (c / gs, c % gs);
            let group = &self.data[g * nb * gs * bytes..][..nb * gs * bytes];
            // SAFETY: AVX-512 is the running ISA (checked at run time); `group` is the row's
            // group of nb blocks, `dst` k = nb * 32 values.
            return unsafe { grouped_row_avx512(self.fmt, group, gs, i, &mut dst[..nb * QK]) };
        }
        self.grouped_blocks(c, 0..nb, dst);
    }

    /// Blocks `blocks` of row `c` of the interleaved groups into `dst` (32 values each), on
    /// scalar code.
    fn grouped_blocks(&self, c: usize, blocks: std::ops::Range<usize>, dst: &mut [f32]) {
        let (bytes, nb, gs) = (self.fmt.bytes(), self.k / QK, self.group);
        let (g, i) = (c / gs, c % gs);
        let qat = group_quants_at(self.fmt, gs);
        let pieces = (bytes - head_bytes(self.fmt)) / 4;
        let has_min = self.fmt.has_min();
        let group = &self.data[g * nb * gs * bytes..][..nb * gs * bytes];
        let group = &group[blocks.start * gs * bytes..blocks.end * gs * bytes];
        for (gb, o) in group.chunks_exact(gs * bytes).zip(dst.chunks_exact_mut(QK)) {
            let d = f16_at(gb, 2 * i);
            let m = if has_min {
                f16_at(gb, 2 * gs + 2 * i)
            } else {
                0.0
            };
            for j in 0..pieces {
                let q = &gb[qat + (j * gs + i) * 4..][..4];
                for (t, &b) in q.iter().enumerate() {
                    match self.fmt {
                        BlockFmt::Q8_0 => o[4 * j + t] = (b as i8) as f32 * d + m,
                        BlockFmt::Q4_0 => {
                            o[4 * j + t] = ((b & 0x0F) as i32 - 8) as f32 * d + m;
                            o[QK / 2 + 4 * j + t] = ((b >> 4) as i32 - 8) as f32 * d + m;
                        }
                        _ => {
                            o[4 * j + t] = (b & 0x0F) as f32 * d + m;
                            o[QK / 2 + 4 * j + t] = (b >> 4) as f32 * d + m;
                        }
                    }
                }
            }
        }
    }

    /// Training panels straight from the interleaved groups (the formats without fifth bits).
    fn has_panels(&self) -> bool {
        self.group > 0 && !has_qh(self.fmt) && G16.is_multiple_of(self.group)
    }

    /// [`WeightMatrix::panel_into`] (the bounds were checked): on AVX-512 with 16-row groups
    /// and whole blocks, each piece of a block is the same four quants of the group's 16 rows
    /// (one 512-bit load), spread into 16-row vectors; else row by row.
    fn panel_t(&self, rows: std::ops::Range<usize>, cols: std::ops::Range<usize>, out: &mut [f32]) {
        let (bytes, nb, gs) = (self.fmt.bytes(), self.k / QK, self.group);
        let whole = cols.start.is_multiple_of(QK) && cols.end.is_multiple_of(QK);
        #[cfg(target_arch = "x86_64")]
        if isa() == Isa::Avx512 && gs == G16 && whole {
            for h in 0..rows.len() / G16 {
                let g = rows.start / G16 + h;
                let group = &self.data[g * nb * gs * bytes..][..nb * gs * bytes];
                let blocks = &group[cols.start / QK * gs * bytes..cols.end / QK * gs * bytes];
                // SAFETY: AVX-512 is the running ISA; `blocks` holds whole blocks of the group,
                // `out` cols.len() positions of PANEL (checked).
                unsafe { group_panel_avx512(self.fmt, blocks, &mut out[G16 * h..]) };
            }
            return;
        }
        let (b0, b1) = (cols.start / QK, cols.end.div_ceil(QK));
        let mut tmp = vec![0f32; (b1 - b0) * QK];
        for (j, r) in rows.enumerate() {
            self.grouped_blocks(r, b0..b1, &mut tmp);
            let at = cols.start - b0 * QK;
            for (p, &v) in tmp[at..at + cols.len()].iter().enumerate() {
                out[p * PANEL + j] = v;
            }
        }
    }

    /// Dots of activation rows `rows` (at most [`GROUP_R`] for 16-row groups, [`GROUP_R8`]
    /// for 8-row groups) with the rows of group `g`. `stream`: the product has one row tile,
    /// so each weight is read once (decode, a small batch, a verification) and the kernel asks
    /// for the lines ahead; with several row tiles the next tile rereads them from cache.
    fn group_tile(
        &self,
        isa: Isa,
        xq: &[XBlock],
        rows: std::ops::Range<usize>,
        g: usize,
        out: &mut [[f32; G16]; GROUP_R],
        stream: bool,
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
                // A tile of as many rows as it has (a few: a verification, a small batch) up
                // to the widest; each row's dots have their own accumulators in every shape,
                // so a row gets the same bits whatever its tile.
                unsafe {
                    let fmt = self.fmt;
                    if gs == G16 {
                        macro_rules! tile16 {
                            ($r:expr) => {{
                                let mut part = [[0f32; G16]; $r];
                                let x = std::array::from_fn(|r| x[r]);
                                group_kernel16::<$r, { chains($r) }>(
                                    fmt, w, x, nb, &mut part, stream,
                                );
                                out[..$r].copy_from_slice(&part);
                            }};
                        }
                        match rows.len() {
                            1 => tile16!(1),
                            2 => tile16!(2),
                            3 => tile16!(3),
                            4 => tile16!(4),
                            5 | 6 => tile16!(6),
                            _ => group_kernel16::<GROUP_R, { chains(GROUP_R) }>(
                                fmt, w, x, nb, out, stream,
                            ),
                        }
                        return;
                    }
                    let vnni = isa.vnni();
                    macro_rules! tile8 {
                        ($r:expr) => {{
                            let mut part = [[0f32; G]; $r];
                            let x = std::array::from_fn(|r| x[r]);
                            group_kernel::<$r, { chains($r) }>(
                                fmt, vnni, w, x, nb, &mut part, stream,
                            );
                            for (o, p) in out.iter_mut().zip(&part) {
                                o[..G].copy_from_slice(p);
                            }
                        }};
                    }
                    match rows.len() {
                        1 => tile8!(1),
                        2 => tile8!(2),
                        3 => tile8!(3),
                        4 => tile8!(4),
                        _ => tile8!(GROUP_R8),
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
        let work: Box<Item<'_>> = if self.group > 0 {
            // Tiles of GROUP_R activation rows x one group, group-major so that a worker's
            // consecutive items reuse the group's weights from cache.
            let gs = self.group;
            let tile = if gs == G16 { GROUP_R } else { GROUP_R8 };
            let row_tiles = m.div_ceil(tile);
            items = row_tiles * (n / gs);
            Box::new(move |item: usize, put: &DstWriter<'_>| {
                let (g, rt) = (item / row_tiles, item % row_tiles);
                let rows = rt * tile..m.min((rt + 1) * tile);
                let mut out = [[0f32; G16]; GROUP_R];
                put.hint(rows.start, g * gs, gs);
                self.group_tile(isa, &xq, rows.clone(), g, &mut out, row_tiles == 1);
                for (r, row) in rows.enumerate() {
                    put.put(row, g * gs, &out[r][..gs]);
                }
            })
        } else if m == 1 {
            // Decode: one activation row, groups of weight rows.
            items = n.div_ceil(DECODE_C);
            Box::new(|g: usize, put: &DstWriter<'_>| {
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
            Box::new(move |item: usize, put: &DstWriter<'_>| {
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
        run_items(items, put, &work);
    }
}

our_weight_matrix!(BlockMatrix, |m| m.fmt.ggml(), true);
