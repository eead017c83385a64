//! Where a matmul's work items write their outputs: [`Dst`] (a fresh buffer) and
//! [`DstWriter`] (bounds-checked writes into a buffer or a column block of a wider one).

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
