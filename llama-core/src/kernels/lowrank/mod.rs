//! Storage of an adapter's matrices and the run-time update `out += f * B (A x)`.
//!
//! Each matrix is kept in the narrowest type that holds every value exactly: 8-bit codes with
//! one f32 scale per group of [`QG`] values where every value is `scale * code` (what a
//! llama.cpp Q8_0 LoRA file holds: 1.125 bytes a value), else f16, bf16, or f32. An f16 file
//! stays f16 (half the bytes a decode step streams), a Q8_0 file 8-bit, an f32 file whose
//! values fit none of these stays f32. Arithmetic is f32, and each value enters it as the same
//! f32 whatever the storage, so the products are the same bits. `A` (`[rank, in]`) is kept in
//! blocks of [`RB`] rank rows interleaved by [`LANES`] input positions ([`a_index`]), so a
//! block's dot products read one stream; `B` transposed (`[rank, out]`) in panels of [`P`]
//! output columns ([`panel_index`]), so the update of any run of columns reads whole contiguous
//! panels. In decode the update rides along the base matmul's pool call ([`super::row`]).

#[cfg(target_arch = "x86_64")]
mod avx2;
#[cfg(target_arch = "x86_64")]
mod avx512;
#[cfg(target_arch = "x86_64")]
use avx2::*;
#[cfg(target_arch = "x86_64")]
use avx512::*;

use half::{bf16, f16};

use crate::error::{Error, Result};
use crate::kernels::simd::Elem;

use crate::exec::Isa;

/// Values per scale of 8-bit storage: along a rank row's inputs in `A`, along an output
/// column's rank values in `B^T` (the blocks of a Q8_0 `lora_a` / `lora_b`).
pub(crate) const QG: usize = 32;

/// Which matrix an 8-bit storage holds (where each value's scale lies).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Layout {
    /// `A`, `[rank, k]`: scales by [`a_scale_index`].
    A { rank: usize, k: usize },
    /// `B^T`, `[rank, n]`: scales by [`b_scale_index`].
    Bt { rank: usize, n: usize },
}

/// A matrix of an adapter (in one of the layouts above), in the narrowest exact type.
#[derive(Clone, Debug)]
pub(crate) enum LoraMat {
    F32(Vec<f32>),
    F16(Vec<f16>),
    BF16(Vec<bf16>),
    /// Value = `s[scale index] * q[index]`, exact in f32.
    Q8 {
        q: Vec<i8>,
        s: Vec<f32>,
        layout: Layout,
    },
}

/// The scale and codes of a group of values that are all `scale * code` exactly (code in
/// -127..=127, the scale the largest magnitude / 127 as llama.cpp's Q8_0 sets it), bit for
/// bit (a negative zero is not); `None` otherwise.
fn q8_group(v: &[f32], codes: &mut [i8]) -> Option<f32> {
    let amax = v.iter().fold(0f32, |m, x| m.max(x.abs()));
    if !amax.is_finite() {
        return None;
    }
    let s = amax / 127.0;
    for (c, &x) in codes.iter_mut().zip(v) {
        let q = if s == 0.0 { 0.0 } else { (x / s).round() };
        if q.abs() > 127.0 {
            return None;
        }
        // The value read back, as the kernels form it (a code has no negative zero).
        *c = q as i8;
        if (*c as f32 * s).to_bits() != x.to_bits() {
            return None;
        }
    }
    Some(s)
}

impl LoraMat {
    /// The values, stored as f16 or bf16 when that is exact for every one of them.
    pub(crate) fn new(v: Vec<f32>) -> LoraMat {
        if v.iter().all(|&x| f16::from_f32(x).to_f32() == x) {
            return LoraMat::F16(v.iter().map(|&x| f16::from_f32(x)).collect());
        }
        if v.iter().all(|&x| bf16::from_f32(x).to_f32() == x) {
            return LoraMat::BF16(v.iter().map(|&x| bf16::from_f32(x)).collect());
        }
        LoraMat::F32(v)
    }

    /// `A` from its `[rank, k]` row-major values, in blocks ([`a_index`]): 8-bit when every
    /// group of [`QG`] inputs of every row is `scale * code` exactly, else as [`LoraMat::new`].
    pub(crate) fn a_from(a: &[f32], rank: usize, k: usize) -> LoraMat {
        let layout = Layout::A { rank, k };
        let mut q8 = (k.is_multiple_of(QG) && !a.is_empty())
            .then(|| (vec![0i8; rank * k], vec![0f32; rank * k / QG], [0i8; QG]));
        let mut laid = vec![0f32; rank * k];
        for j in 0..rank {
            let row = &a[j * k..(j + 1) * k];
            for (i, &v) in row.iter().enumerate() {
                laid[a_index(j, i, rank, k)] = v;
            }
            if let Some((q, s, codes)) = &mut q8 {
                for g in 0..k / QG {
                    match q8_group(&row[g * QG..(g + 1) * QG], codes) {
                        Some(sc) => {
                            s[a_scale_index(j, g, rank, k)] = sc;
                            for (i, &c) in codes.iter().enumerate() {
                                q[a_index(j, g * QG + i, rank, k)] = c;
                            }
                        }
                        None => {
                            q8 = None;
                            break;
                        }
                    }
                }
            }
        }
        match q8 {
            Some((q, s, _)) => LoraMat::Q8 { q, s, layout },
            None => LoraMat::new(laid),
        }
    }

    /// `B^T` from `B`'s `[n, rank]` row-major values, in panels ([`panel_index`]): 8-bit when
    /// every group of [`QG`] rank values of every column is `scale * code` exactly, else as
    /// [`LoraMat::new`].
    pub(crate) fn bt_from(b: &[f32], rank: usize, n: usize) -> LoraMat {
        let layout = Layout::Bt { rank, n };
        let mut q8 = (rank.is_multiple_of(QG) && !b.is_empty())
            .then(|| (vec![0i8; rank * n], vec![0f32; rank * n / QG], [0i8; QG]));
        let mut laid = vec![0f32; rank * n];
        for o in 0..n {
            let col = &b[o * rank..(o + 1) * rank];
            for (j, &v) in col.iter().enumerate() {
                laid[panel_index(j, o, rank, n)] = v;
            }
            if let Some((q, s, codes)) = &mut q8 {
                for g in 0..rank / QG {
                    match q8_group(&col[g * QG..(g + 1) * QG], codes) {
                        Some(sc) => {
                            s[b_scale_index(g, o, rank, n)] = sc;
                            for (j, &c) in codes.iter().enumerate() {
                                q[panel_index(g * QG + j, o, rank, n)] = c;
                            }
                        }
                        None => {
                            q8 = None;
                            break;
                        }
                    }
                }
            }
        }
        match q8 {
            Some((q, s, _)) => LoraMat::Q8 { q, s, layout },
            None => LoraMat::new(laid),
        }
    }

    pub(crate) fn len(&self) -> usize {
        match self {
            LoraMat::F32(v) => v.len(),
            LoraMat::F16(v) => v.len(),
            LoraMat::BF16(v) => v.len(),
            LoraMat::Q8 { q, .. } => q.len(),
        }
    }

    pub(crate) fn bytes(&self) -> usize {
        match self {
            LoraMat::F32(v) => v.len() * 4,
            LoraMat::F16(v) => v.len() * 2,
            LoraMat::BF16(v) => v.len() * 2,
            LoraMat::Q8 { q, s, .. } => q.len() + s.len() * 4,
        }
    }

    /// The values as f32, in the stored layout.
    pub(crate) fn to_f32(&self) -> Vec<f32> {
        match self {
            LoraMat::F32(v) => v.clone(),
            LoraMat::F16(v) => v.iter().map(|x| x.f32()).collect(),
            LoraMat::BF16(v) => v.iter().map(|x| x.f32()).collect(),
            LoraMat::Q8 { q, s, layout } => {
                let mut out = vec![0f32; q.len()];
                match *layout {
                    Layout::A { rank, k } => {
                        for j in 0..rank {
                            for i in 0..k {
                                let e = a_index(j, i, rank, k);
                                out[e] = Codes { q, s }.val(e, a_scale_index(j, i / QG, rank, k));
                            }
                        }
                    }
                    Layout::Bt { rank, n } => {
                        for j in 0..rank {
                            for o in 0..n {
                                let e = panel_index(j, o, rank, n);
                                out[e] = Codes { q, s }.val(e, b_scale_index(j / QG, o, rank, n));
                            }
                        }
                    }
                }
                out
            }
        }
    }

    /// The `rb` rank rows of the block of a stored `A` (`[rank, k]` in blocks of [`RB`] rows,
    /// see [`a_index`]) starting at row `j0`, dotted with `x` (`k` values), into `out[..rb]`.
    /// Each row's dot product: one accumulator over chunks of [`LANES`] positions in order, the
    /// lanes summed, then the tail positions; the same whatever the vector width.
    #[inline]
    pub(crate) fn block_dots(&self, j0: usize, rb: usize, x: &[f32], out: &mut [f32], simd: Isa) {
        // The block and the rest of the matrix after it (which the block's stream asks for
        // ahead).
        let from = j0 * x.len();
        assert!(
            from + rb * x.len() <= self.len(),
            "LoRA block outside its matrix"
        );
        match self {
            LoraMat::F32(v) => block_dots(Plain(&v[from..]), rb, x, out, simd),
            LoraMat::F16(v) => block_dots(Plain(&v[from..]), rb, x, out, simd),
            LoraMat::BF16(v) => block_dots(Plain(&v[from..]), rb, x, out, simd),
            LoraMat::Q8 { q, s, layout } => {
                assert!(
                    matches!(*layout, Layout::A { k, .. } if k == x.len()),
                    "LoRA block of a matrix that is not this A"
                );
                let codes = Codes {
                    q: &q[from..],
                    s: &s[from / QG..],
                };
                block_dots(codes, rb, x, out, simd)
            }
        }
    }

    /// `out[c] += sum_j u[j] * B[lo + c, j]` for the columns `lo..lo + out.len()` of this
    /// `B^T` (`[rank, n]` in panels of [`P`] columns, `rank = u.len()`): per column one
    /// fused multiply-add per rank value, `j` ascending, whatever the vector width, so a column
    /// gets the same bits whichever way a row is split into ranges.
    pub(crate) fn add_cols(&self, n: usize, u: &[f32], lo: usize, out: &mut [f32], simd: Isa) {
        match self {
            LoraMat::F32(v) => add_cols(Plain(v), n, u, lo, out, simd),
            LoraMat::F16(v) => add_cols(Plain(v), n, u, lo, out, simd),
            LoraMat::BF16(v) => add_cols(Plain(v), n, u, lo, out, simd),
            LoraMat::Q8 { q, s, layout } => {
                assert!(
                    *layout == Layout::Bt { rank: u.len(), n },
                    "LoRA column update of a matrix that is not this B"
                );
                add_cols(Codes { q, s }, n, u, lo, out, simd)
            }
        }
    }

    /// Asks for the cache lines of the panels holding columns `lo..hi` of this `B^T`
    /// (`[rank, n]`).
    #[cfg(target_arch = "x86_64")]
    pub(crate) fn prefetch_cols(&self, rank: usize, n: usize, lo: usize, hi: usize) {
        let (a, b) = (lo / P * P, hi.min(n).div_ceil(P) * P);
        let b = b.min(n);
        let lines = |ptr: *const u8, from: usize, to: usize| {
            use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};
            let mut at = from;
            while at < to {
                // SAFETY: a prefetch is a hint that never faults; the address lies in the
                // matrix.
                unsafe { _mm_prefetch::<_MM_HINT_T0>(ptr.wrapping_add(at) as *const i8) };
                at += 64;
            }
        };
        match self {
            LoraMat::F32(v) => lines(v.as_ptr() as *const u8, a * rank * 4, b * rank * 4),
            LoraMat::F16(v) => lines(v.as_ptr() as *const u8, a * rank * 2, b * rank * 2),
            LoraMat::BF16(v) => lines(v.as_ptr() as *const u8, a * rank * 2, b * rank * 2),
            LoraMat::Q8 { q, s, .. } => {
                lines(q.as_ptr() as *const u8, a * rank, b * rank);
                lines(
                    s.as_ptr() as *const u8,
                    a * rank / QG * 4,
                    b * rank / QG * 4,
                );
            }
        }
    }

    pub(crate) fn dtype_name(&self) -> &'static str {
        match self {
            LoraMat::F32(_) => "f32",
            LoraMat::F16(_) => "f16",
            LoraMat::BF16(_) => "bf16",
            LoraMat::Q8 { .. } => "q8",
        }
    }
}

/// Where the scale of group `g` (inputs `g * QG..`) of rank row `j` of an 8-bit `A`
/// (`[rank, k]`) lies: per block of [`RB`] rows (the last one narrower), `[k / QG, rb]`, so a
/// block's scales follow its codes' order.
pub(crate) fn a_scale_index(j: usize, g: usize, rank: usize, k: usize) -> usize {
    let j0 = j / RB * RB;
    let rb = RB.min(rank - j0);
    j0 * (k / QG) + g * rb + (j - j0)
}

/// Where the scale of group `g` (rank values `g * QG..`) of output column `o` of an 8-bit
/// `B^T` (`[rank, n]`) lies: per panel of [`P`] columns, `[rank / QG, width]`.
pub(crate) fn b_scale_index(g: usize, o: usize, rank: usize, n: usize) -> usize {
    let c0 = o / P * P;
    let w = P.min(n - c0);
    c0 * (rank / QG) + g * w + (o - c0)
}

/// How the kernels read a stored matrix: values of one type ([`Plain`]) or 8-bit codes with
/// their scales ([`Codes`]). `e` counts elements from the source's start, `s` scales (which
/// plain values ignore). Every element reads as the same f32 in every method.
trait Src: Copy {
    /// Bytes per element (the stream's, for its prefetch).
    const SIZE: usize;
    /// Element `e`, whose scale is at `s`.
    fn val(self, e: usize, s: usize) -> f32;
    /// The source from element `e` and scale `s` on.
    fn skip(self, e: usize, s: usize) -> Self;
    /// Elements from the start to the end of the matrix.
    fn elems(self) -> usize;
    fn base(self) -> *const u8;
    /// Asks for the lines of scales `s..s + n`.
    #[cfg(target_arch = "x86_64")]
    fn prefetch_scales(self, s: usize, n: usize);
    /// Sixteen elements from `e` with one scale (at `s`), as f32 lanes (AVX-512F code).
    #[cfg(target_arch = "x86_64")]
    unsafe fn row16(self, e: usize, s: usize) -> std::arch::x86_64::__m512;
    /// Eight elements from `e` with one scale (at `s`) (AVX2 code).
    #[cfg(target_arch = "x86_64")]
    unsafe fn row8(self, e: usize, s: usize) -> std::arch::x86_64::__m256;
    /// Sixteen elements from `e`, lane `l`'s scale at `s + l` (AVX-512F code).
    #[cfg(target_arch = "x86_64")]
    unsafe fn col16(self, e: usize, s: usize) -> std::arch::x86_64::__m512;
    /// Eight elements from `e`, lane `l`'s scale at `s + l` (AVX2 code).
    #[cfg(target_arch = "x86_64")]
    unsafe fn col8(self, e: usize, s: usize) -> std::arch::x86_64::__m256;
}

/// Values of one type.
#[derive(Clone, Copy)]
struct Plain<'a, T>(&'a [T]);

impl<T: Elem> Src for Plain<'_, T> {
    const SIZE: usize = std::mem::size_of::<T>();
    #[inline(always)]
    fn val(self, e: usize, _: usize) -> f32 {
        self.0[e].f32()
    }
    #[inline(always)]
    fn skip(self, e: usize, _: usize) -> Self {
        Plain(&self.0[e..])
    }
    #[inline(always)]
    fn elems(self) -> usize {
        self.0.len()
    }
    #[inline(always)]
    fn base(self) -> *const u8 {
        self.0.as_ptr() as *const u8
    }
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    fn prefetch_scales(self, _: usize, _: usize) {}
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn row16(self, e: usize, _: usize) -> std::arch::x86_64::__m512 {
        // SAFETY: the caller's elements lie in the slice; AVX-512F code only.
        unsafe { T::load16(self.0.as_ptr().add(e)) }
    }
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn row8(self, e: usize, _: usize) -> std::arch::x86_64::__m256 {
        // SAFETY: as above; AVX2 code only.
        unsafe { T::load8(self.0.as_ptr().add(e)) }
    }
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn col16(self, e: usize, s: usize) -> std::arch::x86_64::__m512 {
        // SAFETY: as `row16`.
        unsafe { self.row16(e, s) }
    }
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn col8(self, e: usize, s: usize) -> std::arch::x86_64::__m256 {
        // SAFETY: as `row8`.
        unsafe { self.row8(e, s) }
    }
}

/// 8-bit codes and their scales (value = scale * code, exact in f32).
#[derive(Clone, Copy)]
struct Codes<'a> {
    q: &'a [i8],
    s: &'a [f32],
}

impl Src for Codes<'_> {
    const SIZE: usize = 1;
    #[inline(always)]
    fn val(self, e: usize, s: usize) -> f32 {
        self.q[e] as f32 * self.s[s]
    }
    #[inline(always)]
    fn skip(self, e: usize, s: usize) -> Self {
        Codes {
            q: &self.q[e..],
            s: &self.s[s..],
        }
    }
    #[inline(always)]
    fn elems(self) -> usize {
        self.q.len()
    }
    #[inline(always)]
    fn base(self) -> *const u8 {
        self.q.as_ptr() as *const u8
    }
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    fn prefetch_scales(self, s: usize, n: usize) {
        use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};
        let p = self.s.as_ptr() as *const u8;
        let (mut at, end) = (s * 4 / 64 * 64, (s + n).min(self.s.len()) * 4);
        while at < end {
            // SAFETY: a prefetch is a hint that never faults; the address lies in the scales.
            unsafe { _mm_prefetch::<_MM_HINT_T0>(p.wrapping_add(at) as *const i8) };
            at += 64;
        }
    }
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn row16(self, e: usize, s: usize) -> std::arch::x86_64::__m512 {
        use std::arch::x86_64::*;
        // SAFETY: the caller's elements and scale lie in the slices; AVX-512F code only.
        unsafe {
            let c = _mm512_cvtepi8_epi32(_mm_loadu_si128(self.q.as_ptr().add(e) as *const __m128i));
            _mm512_mul_ps(
                _mm512_cvtepi32_ps(c),
                _mm512_set1_ps(*self.s.as_ptr().add(s)),
            )
        }
    }
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn row8(self, e: usize, s: usize) -> std::arch::x86_64::__m256 {
        use std::arch::x86_64::*;
        // SAFETY: as above; AVX2 code only.
        unsafe {
            let c = _mm256_cvtepi8_epi32(_mm_loadl_epi64(self.q.as_ptr().add(e) as *const __m128i));
            _mm256_mul_ps(
                _mm256_cvtepi32_ps(c),
                _mm256_set1_ps(*self.s.as_ptr().add(s)),
            )
        }
    }
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn col16(self, e: usize, s: usize) -> std::arch::x86_64::__m512 {
        use std::arch::x86_64::*;
        // SAFETY: the caller's elements and sixteen scales lie in the slices; AVX-512F only.
        unsafe {
            let c = _mm512_cvtepi8_epi32(_mm_loadu_si128(self.q.as_ptr().add(e) as *const __m128i));
            _mm512_mul_ps(
                _mm512_cvtepi32_ps(c),
                _mm512_loadu_ps(self.s.as_ptr().add(s)),
            )
        }
    }
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn col8(self, e: usize, s: usize) -> std::arch::x86_64::__m256 {
        use std::arch::x86_64::*;
        // SAFETY: the caller's elements and eight scales lie in the slices; AVX2 code only.
        unsafe {
            let c = _mm256_cvtepi8_epi32(_mm_loadl_epi64(self.q.as_ptr().add(e) as *const __m128i));
            _mm256_mul_ps(
                _mm256_cvtepi32_ps(c),
                _mm256_loadu_ps(self.s.as_ptr().add(s)),
            )
        }
    }
}

/// `x . w` in f32.
#[inline]
pub(crate) fn dot<T: Elem>(x: &[f32], w: &[T], simd: Isa) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if simd != Isa::Scalar {
        // SAFETY: `simd` is set only where the CPU has AVX2, FMA and F16C.
        return unsafe { dot_avx2(x, w) };
    }
    let _ = simd;
    x.iter().zip(w).map(|(a, b)| a * b.f32()).sum()
}

/// [`LoraMat::add_cols`] for one storage.
fn add_cols<S: Src>(bt: S, n: usize, u: &[f32], lo: usize, out: &mut [f32], simd: Isa) {
    let r = u.len();
    // Scales per column of a panel (8-bit storage; plain values ignore them).
    let rg = r / QG;
    let hi = lo + out.len();
    assert!(
        bt.elems() >= n * r && hi <= n,
        "LoRA column update outside its matrix"
    );
    // Whole panels end here.
    let whole = hi.min(n / P * P);
    let mut c = lo;
    while c < hi {
        #[cfg(target_arch = "x86_64")]
        if simd != Isa::Scalar && c.is_multiple_of(P) && c + P <= whole {
            // A run of whole panels in one call.
            let q = (whole - c) / P;
            let dst = &mut out[c - lo..c - lo + q * P];
            let src = bt.skip(c * r, c * rg);
            // SAFETY: `simd` is set only where the CPU has AVX2, FMA and F16C (AVX-512F for
            // `Avx512`); `src` holds `q` panels of `r` rows of `P` (and their scales), `dst`
            // `q * P` values.
            unsafe {
                if simd.is_512() {
                    panels_avx512(src, u, dst)
                } else {
                    panels_avx2(src, u, dst)
                }
            }
            c += q * P;
            continue;
        }
        let c0 = c / P * P;
        let w = P.min(n - c0);
        let panel = bt.skip(c0 * r, c0 * rg);
        let end = hi.min(c0 + w);
        let dst = &mut out[c - lo..end - lo];
        let a = c - c0;
        #[cfg(target_arch = "x86_64")]
        if simd != Isa::Scalar && w == P && end - c == 8 && a.is_multiple_of(8) {
            // SAFETY: as above; the half panel starts at `a` and `dst` holds 8 values.
            unsafe { panel8_avx2(panel, u, a, dst) };
            c = end;
            continue;
        }
        let _ = simd;
        for (i, o) in dst.iter_mut().enumerate() {
            let col = a + i;
            let mut v = *o;
            for (j, &uj) in u.iter().enumerate() {
                v = uj.mul_add(panel.val(j * w + col, j / QG * w + col), v);
            }
            *o = v;
        }
        c = end;
    }
}

/// Rank rows per block of a stored `A`.
pub(crate) const RB: usize = 4;
/// Input positions per chunk of a block of `A`: one 512-bit vector of f32.
pub(crate) const LANES: usize = 16;

/// Where `A[j, i]` lies in a stored `A` (`[rank, k]`): blocks of [`RB`] rank rows (the last one
/// narrower), block after block; in a block of `rb` rows, the chunks of [`LANES`] positions one
/// after another, each `[rb, LANES]`, then the tail positions `[rb, k % LANES]`. A block's
/// products read one contiguous stream.
pub(crate) fn a_index(j: usize, i: usize, rank: usize, k: usize) -> usize {
    let j0 = j / RB * RB;
    let rb = RB.min(rank - j0);
    let k16 = k / LANES * LANES;
    let base = j0 * k;
    if i < k16 {
        base + (i / LANES) * rb * LANES + (j - j0) * LANES + i % LANES
    } else {
        base + k16 * rb + (j - j0) * (k - k16) + (i - k16)
    }
}

/// [`LoraMat::block_dots`] for one storage: `w` starts with the block (`rb` rows, and its
/// scales) and runs to the matrix's end.
fn block_dots<S: Src>(w: S, rb: usize, x: &[f32], out: &mut [f32], simd: Isa) {
    let k = x.len();
    let k16 = k / LANES * LANES;
    assert!(w.elems() >= rb * k, "LoRA block outside its matrix");
    #[cfg(target_arch = "x86_64")]
    if simd.is_512() {
        // SAFETY: `Avx512` is set only where the CPU has AVX-512F (and AVX2, FMA, F16C); `w`
        // holds a block of `rb <= RB` rows of `k`.
        unsafe { block_dots_avx512(w, rb, x, out) };
        return;
    }
    #[cfg(target_arch = "x86_64")]
    if simd.is_256() {
        // SAFETY: `Avx2` is set only where the CPU has AVX2, FMA and F16C; as above.
        unsafe { block_dots_avx2(w, rb, x, out) };
        return;
    }
    let mut acc = [[0f32; LANES]; RB];
    for c in 0..k16 / LANES {
        for (r, a) in acc.iter_mut().enumerate().take(rb) {
            let (e, s) = ((c * rb + r) * LANES, c * LANES / QG * rb + r);
            for l in 0..LANES {
                a[l] = w.val(e + l, s).mul_add(x[c * LANES + l], a[l]);
            }
        }
    }
    let _ = simd;
    let tail = k - k16;
    for r in 0..rb {
        // The lanes summed as `_mm512_reduce_add_ps` does: halves, then halves again.
        let mut v = acc[r];
        let mut n = LANES;
        while n > 1 {
            n /= 2;
            for l in 0..n {
                v[l] += v[l + n];
            }
        }
        let mut s = v[0];
        for i in 0..tail {
            // (8-bit storage has no tail: its rows are whole groups.)
            s += x[k16 + i] * w.val(k16 * rb + r * tail + i, 0);
        }
        out[r] = s;
    }
}

/// Asks for the lines `d..d + len` bytes past `p` (`d`: [`crate::kernels::prefetch_distance`]), none at or past
/// `end` (a block's stream runs into the next block of the same matrix, not beyond it).
#[cfg(target_arch = "x86_64")]
#[inline(always)]
fn prefetch_within(p: *const u8, len: usize, end: *const u8) {
    use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};
    let mut at = p.wrapping_add(crate::kernels::prefetch_distance());
    let stop = at.wrapping_add(len);
    while at < stop && at < end {
        // SAFETY: a prefetch is a hint that never faults; the address lies in the matrix.
        unsafe { _mm_prefetch::<_MM_HINT_T0>(at as *const i8) };
        at = at.wrapping_add(64);
    }
}

/// One stored update: `A` `[rank, inp]`, `B^T` `[rank, out]`.
#[derive(Clone, Debug)]
pub(crate) struct Update<'a> {
    pub(crate) rank: usize,
    pub(crate) inp: usize,
    pub(crate) out: usize,
    pub(crate) a: &'a LoraMat,
    pub(crate) bt: &'a LoraMat,
}

/// Output columns per panel of a stored `B^T`: one 512-bit vector of f32 results.
pub(crate) const P: usize = 16;
/// Below this many multiply-adds a product runs on the calling thread alone.
const SERIAL: usize = 1 << 12;

/// `out[i, col..col + n] += f * B (A xs[i])` for the `m` rows of `xs` (`[m, inp]`), `out`
/// `[m, stride]`.
pub(crate) fn apply(
    up: &Update<'_>,
    f: f32,
    xs: &[f32],
    m: usize,
    out: &mut [f32],
    (stride, col, n): (usize, usize, usize),
) -> Result<()> {
    let (r, k) = (up.rank, up.inp);
    let simd = crate::kernels::isa();
    if xs.len() != m * k || up.out != n || out.len() != m * stride || col + n > stride {
        return Err(Error::InvalidArgument(format!(
            "LoRA update [{n}, {r}] x [{r}, {k}] on a [{m}, {}] input into columns {col}..{} of [{m}, {stride}]",
            xs.len() / m.max(1),
            col + n
        )));
    }
    // A x first (rank values per row), scaled once.
    let mut u = vec![0f32; m * r];
    let a_work = m * r * k;
    let fill_row = |row: usize, urow: &mut [f32]| {
        let x = &xs[row * k..(row + 1) * k];
        for j0 in (0..r).step_by(RB) {
            let rb = RB.min(r - j0);
            up.a.block_dots(j0, rb, x, &mut urow[j0..j0 + rb], simd);
        }
        for v in urow.iter_mut() {
            *v *= f;
        }
    };
    if a_work < SERIAL {
        for (row, urow) in u.chunks_exact_mut(r).enumerate() {
            fill_row(row, urow);
        }
    } else {
        crate::pool::for_each_chunk_mut(&mut u, r, &|row, urow| fill_row(row, urow));
    }
    // Then B, row by row.
    if m == 1 || n * r * m < SERIAL {
        for (i, row) in out.chunks_exact_mut(stride).enumerate() {
            up.bt
                .add_cols(n, &u[i * r..(i + 1) * r], 0, &mut row[col..col + n], simd);
        }
    } else {
        crate::pool::for_each_chunk_mut(out, stride, &|i, row| {
            up.bt
                .add_cols(n, &u[i * r..(i + 1) * r], 0, &mut row[col..col + n], simd)
        });
    }
    Ok(())
}

/// Where `B[o, j]` lies in the stored `B^T`: panels of [`P`] output columns (the last one
/// narrower), each `[rank, width]` row-major, so the update of a column range reads whole
/// contiguous panels.
pub(crate) fn panel_index(j: usize, o: usize, rank: usize, out: usize) -> usize {
    let c0 = o / P * P;
    let w = P.min(out - c0);
    c0 * rank + j * w + (o - c0)
}
