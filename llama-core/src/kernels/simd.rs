//! SIMD helpers shared by the kernels and attention: f32/f16 element loads, the four-vector
//! horizontal sum, the vectorized `exp`, and prefetching the weights a decode kernel streams.

use half::f16;

/// How far ahead of the weights they read (bytes) the decode kernels ask for the cache lines.
/// A decode step streams every weight once; with the unpacking and multiply work between its
/// loads, the out-of-order window alone keeps too few cache misses in flight to reach the
/// memory bandwidth (measured on a Zen 5 EPYC, 2 threads: f16 decode +25%, Q8_0 +25%, Q4_1
/// +40%). 4 KiB on AMD's cores, where it was tuned; 2 KiB on Intel's, where 4 KiB ran ahead of
/// what the core keeps in flight (a Xeon VM, 1B-shape weights streaming from DRAM: f16 decode
/// +15-18%, Q4_0 +7-10% over 4 KiB; 1 KiB fell back; docs/performance.md).
#[cfg(target_arch = "x86_64")]
#[inline(always)]
pub(crate) fn prefetch_distance() -> usize {
    if stream_nta() {
        4096
    } else {
        2048
    }
}

/// Asks for the cache lines of `len` bytes [`prefetch_distance`] past `p`; called for each piece of
/// weights a decode kernel reads, so the lines asked for run on without gaps. Non-temporal on
/// AMD's cores ([`stream_nta`]), for the first level otherwise.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
pub(crate) fn prefetch_ahead(p: *const u8, len: usize) {
    use std::arch::x86_64::{_MM_HINT_NTA, _MM_HINT_T0};
    if stream_nta() {
        prefetch_lines::<_MM_HINT_NTA>(p, len)
    } else {
        prefetch_lines::<_MM_HINT_T0>(p, len)
    }
}

#[cfg(target_arch = "x86_64")]
#[inline(always)]
fn prefetch_lines<const HINT: i32>(p: *const u8, len: usize) {
    let ahead = prefetch_distance();
    let mut at = 0;
    while at < len {
        // SAFETY: a prefetch is a hint that never faults, whatever the address (which may lie
        // past the end of the matrix, hence `wrapping_add`).
        unsafe { std::arch::x86_64::_mm_prefetch::<HINT>(p.wrapping_add(ahead + at) as *const i8) };
        at += 64;
    }
}

/// Whether the decode kernels prefetch the weights they stream non-temporally: on AMD's Zen
/// cores. Their L3 is filled by what leaves L2, so every line of a stream read once per token
/// is written into L3 on its way out (traffic, and the adapters, caches and activations pushed
/// out); lines fetched non-temporally skip that. Measured on a Zen 5 EPYC, 2 threads, SmolLM2
/// Q4_1: decode +5-8% (docs/performance.md). Intel's cores keep the T0 hint they were
/// measured with. Read once (CPUID), then one relaxed load.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
pub(crate) fn stream_nta() -> bool {
    use std::sync::atomic::{AtomicU8, Ordering};
    // 0: not read yet, 1: T0, 2: NTA.
    static HINT: AtomicU8 = AtomicU8::new(0);
    match HINT.load(Ordering::Relaxed) {
        1 => false,
        2 => true,
        _ => {
            // SAFETY: CPUID leaf 0 exists on every x86-64 CPU.
            #[allow(unused_unsafe)]
            let r = unsafe { std::arch::x86_64::__cpuid(0) };
            let amd = (r.ebx, r.edx, r.ecx) == (0x6874_7541, 0x6974_6e65, 0x444d_4163);
            HINT.store(if amd { 2 } else { 1 }, Ordering::Relaxed);
            amd
        }
    }
}

/// A stored key or value element: f32, or f16 read through F16C. Both give the same lanes and
/// summation order, so an f16 cache gives exactly what an f32 cache holding the same rounded
/// values would.
pub(crate) trait Elem: Copy {
    fn f32(self) -> f32;
    /// Eight elements from `p` as f32 lanes.
    #[cfg(target_arch = "x86_64")]
    unsafe fn load8(p: *const Self) -> std::arch::x86_64::__m256;
    /// Sixteen elements from `p` as f32 lanes (AVX-512F code only).
    #[cfg(target_arch = "x86_64")]
    unsafe fn load16(p: *const Self) -> std::arch::x86_64::__m512;
}

impl Elem for f32 {
    #[inline(always)]
    fn f32(self) -> f32 {
        self
    }
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load8(p: *const f32) -> std::arch::x86_64::__m256 {
        // SAFETY: the caller's pointer covers eight elements; only called from AVX2 code.
        unsafe { std::arch::x86_64::_mm256_loadu_ps(p) }
    }
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load16(p: *const f32) -> std::arch::x86_64::__m512 {
        // SAFETY: the caller's pointer covers sixteen elements; only called from AVX-512F code.
        unsafe { std::arch::x86_64::_mm512_loadu_ps(p) }
    }
}

impl Elem for f16 {
    #[inline(always)]
    fn f32(self) -> f32 {
        self.to_f32()
    }
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load8(p: *const f16) -> std::arch::x86_64::__m256 {
        use std::arch::x86_64::*;
        // SAFETY: the caller's pointer covers eight elements; only called from F16C code.
        unsafe { _mm256_cvtph_ps(_mm_loadu_si128(p as *const __m128i)) }
    }
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load16(p: *const f16) -> std::arch::x86_64::__m512 {
        use std::arch::x86_64::*;
        // SAFETY: the caller's pointer covers sixteen elements; only called from AVX-512F code.
        unsafe { _mm512_cvtph_ps(_mm256_loadu_si256(p as *const __m256i)) }
    }
}

impl Elem for half::bf16 {
    #[inline(always)]
    fn f32(self) -> f32 {
        f32::from_bits((self.to_bits() as u32) << 16)
    }
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load8(p: *const half::bf16) -> std::arch::x86_64::__m256 {
        use std::arch::x86_64::*;
        // SAFETY: the caller's pointer covers eight elements; only called from AVX2 code. A
        // bf16 is the high half of an f32.
        unsafe {
            _mm256_castsi256_ps(_mm256_slli_epi32::<16>(_mm256_cvtepu16_epi32(
                _mm_loadu_si128(p as *const __m128i),
            )))
        }
    }
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load16(p: *const half::bf16) -> std::arch::x86_64::__m512 {
        use std::arch::x86_64::*;
        // SAFETY: the caller's pointer covers sixteen elements; only called from AVX-512F code.
        unsafe {
            _mm512_castsi512_ps(_mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(
                _mm256_loadu_si256(p as *const __m256i),
            )))
        }
    }
}

/// The horizontal sums of four 8-lane vectors together, with the pairings of a one-vector
/// sum (lanes `i + (i+4)`, then `0+2` and `1+3`, then those two), so each equals what
/// summing its vector alone gives.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
pub(crate) unsafe fn hsum4(v: [std::arch::x86_64::__m256; 4]) -> [f32; 4] {
    use std::arch::x86_64::*;
    // Lanes i + i+4: vectors 0 and 1 (low and high half), vectors 2 and 3.
    let ab = _mm256_add_ps(
        _mm256_permute2f128_ps::<0x20>(v[0], v[1]),
        _mm256_permute2f128_ps::<0x31>(v[0], v[1]),
    );
    let cd = _mm256_add_ps(
        _mm256_permute2f128_ps::<0x20>(v[2], v[3]),
        _mm256_permute2f128_ps::<0x31>(v[2], v[3]),
    );
    // 0+2 and 1+3: [v0, v0, v2, v2 | v1, v1, v3, v3].
    let x = _mm256_add_ps(
        _mm256_shuffle_ps::<0x44>(ab, cd),
        _mm256_shuffle_ps::<0xEE>(ab, cd),
    );
    let x = _mm256_add_ps(x, _mm256_shuffle_ps::<0xB1>(x, x));
    let mut lanes = [0f32; 8];
    _mm256_storeu_ps(lanes.as_mut_ptr(), x);
    [lanes[0], lanes[4], lanes[2], lanes[6]]
}

/// `exp(x)` on eight lanes, within 2 ulp of the exact value: `x = n ln2 + r` with `|r| <=
/// ln2/2` (ln2 split in two so that `r` is exact), a degree-7 polynomial for `exp(r)` and
/// `2^n` from the exponent bits. Below -87.3 (where the result would leave the normal range)
/// the result is 0; above 88 it is `exp(88)` (finite).
#[cfg(target_arch = "x86_64")]
/// # Safety
/// The CPU supports `avx2,fma` (the caller checked at run time).
#[target_feature(enable = "avx2,fma")]
pub(crate) unsafe fn exp8(x: std::arch::x86_64::__m256) -> std::arch::x86_64::__m256 {
    use std::arch::x86_64::*;
    let live = _mm256_cmp_ps::<_CMP_GE_OQ>(x, _mm256_set1_ps(-87.3));
    let x = _mm256_min_ps(
        _mm256_max_ps(x, _mm256_set1_ps(-87.3)),
        _mm256_set1_ps(88.0),
    );
    let n = _mm256_round_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(_mm256_mul_ps(
        x,
        _mm256_set1_ps(std::f32::consts::LOG2_E),
    ));
    let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693_359_4), x);
    let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.121_944_4e-4), r);
    // Taylor coefficients 1/7! .. 1/2!, then r^2 p + r + 1.
    let mut p = _mm256_set1_ps(1.0 / 5040.0);
    for c in [1.0 / 720.0, 1.0 / 120.0, 1.0 / 24.0, 1.0 / 6.0, 0.5] {
        p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(c));
    }
    let p = _mm256_fmadd_ps(
        p,
        _mm256_mul_ps(r, r),
        _mm256_add_ps(r, _mm256_set1_ps(1.0)),
    );
    let scale = _mm256_castsi256_ps(_mm256_slli_epi32::<23>(_mm256_add_epi32(
        _mm256_cvtps_epi32(n),
        _mm256_set1_epi32(127),
    )));
    _mm256_and_ps(_mm256_mul_ps(p, scale), live)
}

/// A 16 x 16 transpose of f32 in registers: `out[c]` lane `r` = `rows[r]` lane `c` (pairs,
/// then quads within 128-bit lanes, then the lanes).
#[cfg(target_arch = "x86_64")]
/// # Safety
/// The CPU supports `avx512f` (the caller checked at run time).
#[target_feature(enable = "avx512f")]
pub(crate) unsafe fn transpose16(
    rows: [std::arch::x86_64::__m512; 16],
) -> [std::arch::x86_64::__m512; 16] {
    use std::arch::x86_64::*;
    let mut t = [_mm512_setzero_ps(); 16];
    for i in 0..8 {
        t[2 * i] = _mm512_unpacklo_ps(rows[2 * i], rows[2 * i + 1]);
        t[2 * i + 1] = _mm512_unpackhi_ps(rows[2 * i], rows[2 * i + 1]);
    }
    // u[4i + c]: in 128-bit lane L, rows 4i..4i + 4 at column 4L + c.
    let mut u = [_mm512_setzero_ps(); 16];
    for i in 0..4 {
        u[4 * i] = _mm512_shuffle_ps::<0x44>(t[4 * i], t[4 * i + 2]);
        u[4 * i + 1] = _mm512_shuffle_ps::<0xEE>(t[4 * i], t[4 * i + 2]);
        u[4 * i + 2] = _mm512_shuffle_ps::<0x44>(t[4 * i + 1], t[4 * i + 3]);
        u[4 * i + 3] = _mm512_shuffle_ps::<0xEE>(t[4 * i + 1], t[4 * i + 3]);
    }
    let mut out = [_mm512_setzero_ps(); 16];
    for c in 0..4 {
        let s0 = _mm512_shuffle_f32x4::<0x44>(u[c], u[4 + c]);
        let s1 = _mm512_shuffle_f32x4::<0xEE>(u[c], u[4 + c]);
        let s2 = _mm512_shuffle_f32x4::<0x44>(u[8 + c], u[12 + c]);
        let s3 = _mm512_shuffle_f32x4::<0xEE>(u[8 + c], u[12 + c]);
        out[c] = _mm512_shuffle_f32x4::<0x88>(s0, s2);
        out[4 + c] = _mm512_shuffle_f32x4::<0xDD>(s0, s2);
        out[8 + c] = _mm512_shuffle_f32x4::<0x88>(s1, s3);
        out[12 + c] = _mm512_shuffle_f32x4::<0xDD>(s1, s3);
    }
    out
}
