//! The CPU's vector extensions, detected once per process, and the tokens that prove them.
//!
//! A kernel written for an instruction set takes that set's token ([`Avx2`], [`Vnni256`],
//! [`Avx512`], [`Vnni`]); only this module makes tokens, and only after detection succeeded, so
//! safe code elsewhere cannot choose a path the CPU does not run.
//!
//! `CHATHUB_CPU=portable|avx2|avxvnni|avx512|avx512vnni` caps the level (never raises it), so
//! the same test suite runs each kernel's portable twin, its AVX2 path and its 256-bit VNNI path
//! on a machine with AVX-512 VNNI.

use std::sync::LazyLock;

/// Instruction-set levels the kernels are written for, lowest first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum Level {
    /// Plain Rust: every kernel's portable twin.
    Portable,
    /// AVX2 with FMA and F16C (most x86 laptops and desktops since 2013).
    Avx2,
    /// AVX2 with 256-bit `vpdpbusd`: AVX-VNNI (Intel laptops and desktops since Alder Lake,
    /// AMD since Zen 5, none of them with AVX-512 on the Intel side), or AVX-512 VNNI capped to
    /// 256-bit vectors here.
    AvxVnni,
    /// AVX-512F/BW/VL with F16C.
    Avx512,
    /// AVX-512 with VNNI (`vpdpbusd`).
    Avx512Vnni,
}

impl Level {
    /// The name `CHATHUB_CPU` takes for this level.
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Level::Portable => "portable",
            Level::Avx2 => "avx2",
            Level::AvxVnni => "avxvnni",
            Level::Avx512 => "avx512",
            Level::Avx512Vnni => "avx512vnni",
        }
    }

    fn parse(s: &str) -> Option<Self> {
        [
            Level::Portable,
            Level::Avx2,
            Level::AvxVnni,
            Level::Avx512,
            Level::Avx512Vnni,
        ]
        .into_iter()
        .find(|l| l.as_str().eq_ignore_ascii_case(s.trim()))
    }
}

/// What this CPU runs, before any cap.
fn detect() -> Level {
    #[cfg(target_arch = "x86_64")]
    {
        use std::is_x86_feature_detected as has;
        let avx2 = has!("avx2") && has!("fma") && has!("f16c");
        let avx512 = avx2 && has!("avx512f") && has!("avx512bw") && has!("avx512vl");
        if avx512 && has!("avx512vnni") {
            return Level::Avx512Vnni;
        }
        if avx512 {
            return Level::Avx512;
        }
        if avx2 && has!("avxvnni") {
            return Level::AvxVnni;
        }
        if avx2 {
            return Level::Avx2;
        }
    }
    Level::Portable
}

static LEVEL: LazyLock<Level> = LazyLock::new(|| {
    let detected = *DETECTED;
    let level = match std::env::var("CHATHUB_CPU") {
        Ok(cap) => match Level::parse(&cap) {
            Some(cap) => cap.min(detected),
            None => {
                tracing::warn!(
                    value = %cap,
                    "CHATHUB_CPU is not portable, avx2, avxvnni, avx512 or avx512vnni: ignored"
                );
                detected
            }
        },
        Err(_) => detected,
    };
    if level != detected {
        tracing::info!(
            detected = detected.as_str(),
            used = level.as_str(),
            "kernels capped by CHATHUB_CPU"
        );
    }
    level
});

/// The level the kernels use in this process: the CPU's, capped by `CHATHUB_CPU`.
pub(crate) fn level() -> Level {
    *LEVEL
}

/// Whether `CHATHUB_CPU` holds the kernels below what the CPU runs (tests of the fallbacks).
pub(crate) fn capped() -> bool {
    level() < *DETECTED
}

static DETECTED: LazyLock<Level> = LazyLock::new(detect);

/// Whether the CPU is AMD's (its memory system wants different prefetching: see
/// `kernels::PREFETCH_AHEAD`).
pub(crate) fn amd() -> bool {
    *AMD
}

static AMD: LazyLock<bool> = LazyLock::new(|| {
    #[cfg(target_arch = "x86_64")]
    {
        let vendor = std::arch::x86_64::__cpuid(0);
        let bytes: Vec<u8> = [vendor.ebx, vendor.edx, vendor.ecx]
            .iter()
            .flat_map(|word| word.to_le_bytes())
            .collect();
        bytes == b"AuthenticAMD"
    }
    #[cfg(not(target_arch = "x86_64"))]
    false
});

/// Proof that the CPU runs AVX2, FMA and F16C.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Avx2 {
    _detected: (),
}

/// Proof that the CPU runs `vpdpbusd` on 256-bit vectors (and everything [`Avx2`] proves),
/// and in which encoding: AVX-VNNI's VEX one, or AVX-512 VNNI's EVEX one (a CPU with AVX-512
/// VNNI capped to this level by `CHATHUB_CPU`, which is how the path is tested there).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Vnni256 {
    evex: bool,
}

impl Vnni256 {
    /// Whether the EVEX encoding (AVX-512 VNNI with VL) is the one this CPU runs.
    pub(crate) fn evex(self) -> bool {
        self.evex
    }
}

/// Proof that the CPU runs AVX-512F/BW/VL (and AVX2, FMA, F16C).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Avx512 {
    _detected: (),
}

/// Proof that the CPU runs AVX-512 VNNI (and everything [`Avx512`] proves).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Vnni {
    _detected: (),
}

/// The AVX2 token, when this process's level allows it.
pub(crate) fn avx2() -> Option<Avx2> {
    (level() >= Level::Avx2).then_some(Avx2 { _detected: () })
}

/// The 256-bit VNNI token, when this process's level allows it and the CPU runs `vpdpbusd` on
/// 256-bit vectors in either encoding (a CPU with AVX-512 but no VNNI does not).
pub(crate) fn vnni256() -> Option<Vnni256> {
    if level() < Level::AvxVnni {
        return None;
    }
    match *DETECTED {
        Level::Avx512Vnni => Some(Vnni256 { evex: true }),
        Level::AvxVnni => Some(Vnni256 { evex: false }),
        _ => None,
    }
}

/// The AVX-512 token, when this process's level allows it.
pub(crate) fn avx512() -> Option<Avx512> {
    (level() >= Level::Avx512).then_some(Avx512 { _detected: () })
}

/// The VNNI token, when this process's level allows it.
pub(crate) fn vnni() -> Option<Vnni> {
    (level() >= Level::Avx512Vnni).then_some(Vnni { _detected: () })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn levels_parse_and_order() {
        assert_eq!(Level::parse("AVX2"), Some(Level::Avx2));
        assert_eq!(Level::parse("portable"), Some(Level::Portable));
        assert_eq!(Level::parse("sse"), None);
        assert_eq!(Level::parse("avxvnni"), Some(Level::AvxVnni));
        assert!(Level::Portable < Level::Avx2 && Level::Avx512 < Level::Avx512Vnni);
        assert!(Level::Avx2 < Level::AvxVnni && Level::AvxVnni < Level::Avx512);
        // Tokens exist exactly at or below the process's level.
        assert_eq!(avx2().is_some(), level() >= Level::Avx2);
        assert_eq!(avx512().is_some(), level() >= Level::Avx512);
        assert_eq!(vnni().is_some(), level() >= Level::Avx512Vnni);
        assert!(vnni256().is_none() || level() >= Level::AvxVnni);
    }
}
