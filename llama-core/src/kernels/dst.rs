//! Where a matmul's work items write their outputs: [`Dst`] (a fresh buffer) and
//! [`DstWriter`] (bounds-checked writes into a buffer or a column block of a wider one).

use super::{Pending, Rider};
use crate::pool::SharedMut;

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
    buf: SharedMut<'a, f32>,
    /// The first column of the block this writer covers.
    col0: usize,
    m: usize,
    n: usize,
    /// Values from one row to the next (`n` unless the output is a column block of a wider
    /// buffer).
    stride: usize,
    /// Work riding along the matmul (a LoRA update of a one-row output), and the piece of the
    /// row the current thread's items wrote but did not finish yet (set for each run of items
    /// by `run_items`).
    rider: Option<&'a dyn Rider>,
    pending: Option<&'a Pending<'a>>,
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
        let (m, n) = (self.m, self.n);
        DstWriter {
            buf: SharedMut::spare(&mut self.buf),
            col0: 0,
            m,
            n,
            stride: n,
            rider: None,
            pending: None,
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
            buf: SharedMut::new(out),
            col0,
            m,
            n,
            stride,
            rider: None,
            pending: None,
        }
    }

    /// This writer with `rider` riding along the matmul's pool calls ([`Rider`]): only a
    /// one-row output has its pieces finished.
    pub(crate) fn riding(self, rider: &'a dyn Rider) -> DstWriter<'a> {
        DstWriter {
            rider: (self.m == 1).then_some(rider),
            ..self
        }
    }

    pub(crate) fn rider(&self) -> Option<&'a dyn Rider> {
        self.rider
    }

    /// The writer one thread's run of items puts through, joining their pieces in `pending`.
    pub(crate) fn pending<'b>(&self, pending: &'b Pending<'b>) -> DstWriter<'b>
    where
        'a: 'b,
    {
        DstWriter {
            pending: Some(pending),
            ..*self
        }
    }

    /// Says that an item is about to compute row `row`, columns `col..col + len`: a rider
    /// (a LoRA update) asks for the cache lines it will read when the piece is put.
    #[inline]
    pub(crate) fn hint(&self, row: usize, col: usize, len: usize) {
        if let (Some(p), 0) = (self.pending, row) {
            p.rider().prefetch(self.col0 + col, len);
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
        let at = row * self.stride + self.col0 + col;
        // SAFETY: no two work items write the same element (the shared buffer checks bounds).
        unsafe { self.buf.write(at, vals) };
        if let Some(p) = self.pending {
            // A piece of a one-row output under a rider (a LoRA update): it adds to the piece
            // later in the thread's run of items.
            p.written(self.col0 + col, self.buf.ptr_at(at, vals.len()), vals.len());
        }
    }
}
