//! How the core computes: the kernel path ([`Kernel`], a field of
//! [`ModelOptions`](crate::ModelOptions)) and whether weights are regrouped for it, set for the
//! duration of each call into the core (load, forward passes) and carried by the thread pool to
//! its workers. Nothing here reads the environment: the CLI does that and passes options.

use std::cell::Cell;

use crate::error::{Error, Result};

/// Which kernels compute a model.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Hash)]
#[non_exhaustive]
pub enum Kernel {
    /// The widest path this CPU runs (AVX-512, then 256-bit VNNI, then AVX2, else scalar).
    #[default]
    Auto,
    /// Portable scalar code (the same results on every machine).
    Scalar,
    /// x86-64 AVX2 + FMA + F16C.
    Avx2,
    /// AVX2 plus 256-bit AVX-512 VNNI integer dot products.
    Vnni256,
    /// AVX-512 (F, BW, VL, VNNI): the 512-bit kernels where written, 256-bit VNNI elsewhere.
    Avx512,
    /// candle's kernels and tensor operations throughout (the reference path, for comparison).
    Candle,
}

/// The SIMD level our kernels run at.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) enum Isa {
    Scalar,
    #[cfg(target_arch = "x86_64")]
    Avx2,
    #[cfg(target_arch = "x86_64")]
    Vnni,
    /// AVX-512 (F, BW, VL, VNNI): the 256-bit VNNI kernels, plus 512-bit ones where written.
    #[cfg(target_arch = "x86_64")]
    Avx512,
}

impl Isa {
    /// 512-bit vectors (AVX-512F) run.
    pub(crate) fn is_512(self) -> bool {
        #[cfg(target_arch = "x86_64")]
        return self == Isa::Avx512;
        #[cfg(not(target_arch = "x86_64"))]
        false
    }

    /// The 256-bit paths (AVX2, FMA, F16C; VNNI or not) run, and not the 512-bit ones.
    pub(crate) fn is_256(self) -> bool {
        self != Isa::Scalar && !self.is_512()
    }

    /// VNNI on 256-bit vectors is available.
    #[cfg(target_arch = "x86_64")]
    pub(crate) fn vnni(self) -> bool {
        matches!(self, Isa::Vnni | Isa::Avx512)
    }
}

/// What the CPU supports, detected once.
#[derive(Clone, Copy)]
struct Cpu {
    avx2: bool,
    vnni: bool,
    avx512: bool,
}

fn cpu() -> Cpu {
    static CPU: std::sync::OnceLock<Cpu> = std::sync::OnceLock::new();
    *CPU.get_or_init(|| {
        #[cfg(target_arch = "x86_64")]
        {
            let avx2 = is_x86_feature_detected!("avx2")
                && is_x86_feature_detected!("fma")
                && is_x86_feature_detected!("f16c");
            let vnni = avx2
                && is_x86_feature_detected!("avx512vnni")
                && is_x86_feature_detected!("avx512vl");
            let avx512 =
                vnni && is_x86_feature_detected!("avx512f") && is_x86_feature_detected!("avx512bw");
            Cpu { avx2, vnni, avx512 }
        }
        #[cfg(not(target_arch = "x86_64"))]
        Cpu {
            avx2: false,
            vnni: false,
            avx512: false,
        }
    })
}

impl Kernel {
    /// Every name [`Kernel::parse`] takes, in the order of [`Kernel::as_str`].
    pub const NAMES: [&'static str; 6] = ["auto", "scalar", "avx2", "vnni256", "avx512", "candle"];

    /// Parses `auto`, `scalar`, `avx2`, `vnni256`, `avx512` or `candle` (case-insensitive).
    pub fn parse(s: &str) -> Result<Kernel> {
        Ok(match s.to_ascii_lowercase().as_str() {
            "auto" | "" => Kernel::Auto,
            "scalar" => Kernel::Scalar,
            "avx2" => Kernel::Avx2,
            "vnni256" => Kernel::Vnni256,
            "avx512" => Kernel::Avx512,
            "candle" => Kernel::Candle,
            other => {
                return Err(Error::InvalidArgument(format!(
                    "unknown kernel `{other}` (one of {})",
                    Kernel::NAMES.join(", ")
                )))
            }
        })
    }

    /// The name [`Kernel::parse`] takes.
    pub fn as_str(self) -> &'static str {
        match self {
            Kernel::Auto => "auto",
            Kernel::Scalar => "scalar",
            Kernel::Avx2 => "avx2",
            Kernel::Vnni256 => "vnni256",
            Kernel::Avx512 => "avx512",
            Kernel::Candle => "candle",
        }
    }

    /// Whether this CPU runs the path (`Auto`, `Scalar` and `Candle` always).
    pub fn is_supported(self) -> bool {
        let c = cpu();
        match self {
            Kernel::Auto | Kernel::Scalar | Kernel::Candle => true,
            Kernel::Avx2 => c.avx2,
            Kernel::Vnni256 => c.vnni,
            Kernel::Avx512 => c.avx512,
        }
    }

    /// The concrete paths this CPU runs (every kernel but `Auto`).
    pub fn available() -> Vec<Kernel> {
        [
            Kernel::Scalar,
            Kernel::Avx2,
            Kernel::Vnni256,
            Kernel::Avx512,
            Kernel::Candle,
        ]
        .into_iter()
        .filter(|k| k.is_supported())
        .collect()
    }

    /// The concrete path: `Auto` becomes the widest one supported; a path this CPU lacks is an
    /// error.
    pub fn resolve(self) -> Result<Kernel> {
        if !self.is_supported() {
            return Err(Error::InvalidArgument(format!(
                "kernel `{}` is not supported by this CPU (available: {})",
                self.as_str(),
                Kernel::available()
                    .iter()
                    .map(|k| k.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            )));
        }
        let c = cpu();
        Ok(match self {
            Kernel::Auto if c.avx512 => Kernel::Avx512,
            Kernel::Auto if c.vnni => Kernel::Vnni256,
            Kernel::Auto if c.avx2 => Kernel::Avx2,
            Kernel::Auto => Kernel::Scalar,
            k => k,
        })
    }

    /// The SIMD level our kernels take on this path. candle's path takes the widest one for the
    /// few of our routines it shares (it does not run our matmul or attention kernels).
    pub(crate) fn isa(self) -> Isa {
        #[cfg(target_arch = "x86_64")]
        {
            let best = || match Kernel::Auto.resolve() {
                Ok(Kernel::Avx512) => Isa::Avx512,
                Ok(Kernel::Vnni256) => Isa::Vnni,
                Ok(Kernel::Avx2) => Isa::Avx2,
                _ => Isa::Scalar,
            };
            match self {
                Kernel::Scalar => Isa::Scalar,
                Kernel::Avx2 => Isa::Avx2,
                Kernel::Vnni256 => Isa::Vnni,
                Kernel::Avx512 => Isa::Avx512,
                Kernel::Auto | Kernel::Candle => best(),
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            let _ = self;
            Isa::Scalar
        }
    }
}

impl std::fmt::Display for Kernel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The kernel settings a call runs under.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Settings {
    /// A concrete path (never `Auto`).
    pub(crate) kernel: Kernel,
    pub(crate) isa: Isa,
    /// Weights regrouped into the SIMD kernels' row groups at load (false keeps the file's row
    /// layout: slower, for comparison).
    pub(crate) repack: bool,
}

impl Settings {
    pub(crate) fn new(kernel: Kernel, repack: bool) -> Result<Settings> {
        let kernel = kernel.resolve()?;
        Ok(Settings {
            kernel,
            isa: kernel.isa(),
            repack,
        })
    }

    /// The settings of a call that installed none: the widest path. Unit tests (only) take the
    /// path from `LLAMA_CORE_KERNEL`, so one test binary covers each path in turn.
    fn fallback() -> Settings {
        #[cfg(test)]
        let kernel = std::env::var("LLAMA_CORE_KERNEL")
            .ok()
            .and_then(|k| Kernel::parse(&k).ok())
            .filter(|k| k.is_supported())
            .unwrap_or_default();
        #[cfg(not(test))]
        let kernel = Kernel::Auto;
        Settings::new(kernel, true).unwrap_or(Settings {
            kernel: Kernel::Scalar,
            isa: Isa::Scalar,
            repack: true,
        })
    }

    /// Whether our kernels run (not candle's).
    pub(crate) fn ours(self) -> bool {
        self.kernel != Kernel::Candle
    }
}

thread_local! {
    static CURRENT: Cell<Option<Settings>> = const { Cell::new(None) };
}

/// The settings of the running call.
pub(crate) fn current() -> Settings {
    CURRENT.with(|c| c.get()).unwrap_or_else(|| {
        static FALLBACK: std::sync::OnceLock<Settings> = std::sync::OnceLock::new();
        *FALLBACK.get_or_init(Settings::fallback)
    })
}

/// Runs `f` under `s` (restored afterwards, also when `f` panics).
pub(crate) fn with_settings<R>(s: Settings, f: impl FnOnce() -> R) -> R {
    struct Restore(Option<Settings>);
    impl Drop for Restore {
        fn drop(&mut self) {
            CURRENT.with(|c| c.set(self.0));
        }
    }
    let _restore = Restore(CURRENT.with(|c| c.replace(Some(s))));
    f()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_resolve() {
        for name in Kernel::NAMES {
            let k = Kernel::parse(name).unwrap();
            assert_eq!(k.as_str(), name);
            assert_eq!(Kernel::parse(&name.to_uppercase()).unwrap(), k);
            if k.is_supported() {
                let r = k.resolve().unwrap();
                assert_ne!(r, Kernel::Auto);
                assert!(Kernel::available().contains(&r));
            } else {
                assert!(k.resolve().is_err());
            }
        }
        assert!(Kernel::parse("avx1024").is_err());
        assert!(Kernel::available().contains(&Kernel::Scalar));
        assert!(Kernel::available().contains(&Kernel::Candle));
    }

    #[test]
    fn settings_nest_and_restore() {
        let outer = current();
        let s = Settings::new(Kernel::Scalar, false).unwrap();
        with_settings(s, || {
            assert_eq!(current(), s);
            let c = Settings::new(Kernel::Candle, true).unwrap();
            with_settings(c, || assert!(!current().ours()));
            assert_eq!(current(), s);
        });
        assert_eq!(current(), outer);
    }
}
