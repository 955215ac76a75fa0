//! Instruction-set selection, done once at run time.

use crate::error::{KernelError, Result};

/// The SIMD instruction set a kernel call runs on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Isa {
    /// Portable reference code; every SIMD path is tested against it.
    Scalar,
    /// x86-64 with AVX2, FMA and F16C.
    Avx2,
    /// aarch64 Advanced SIMD.
    Neon,
}

impl Isa {
    /// Every ISA this crate knows, fastest first.
    pub const ALL: [Isa; 3] = [Isa::Avx2, Isa::Neon, Isa::Scalar];

    /// Lower-case name, as accepted by `LUTRA_ISA`.
    pub fn name(self) -> &'static str {
        match self {
            Isa::Scalar => "scalar",
            Isa::Avx2 => "avx2",
            Isa::Neon => "neon",
        }
    }

    /// Whether this CPU can run the ISA.
    pub fn is_supported(self) -> bool {
        match self {
            Isa::Scalar => true,
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 => {
                is_x86_feature_detected!("avx2")
                    && is_x86_feature_detected!("fma")
                    && is_x86_feature_detected!("f16c")
            }
            #[cfg(target_arch = "aarch64")]
            Isa::Neon => std::arch::is_aarch64_feature_detected!("neon"),
            #[allow(unreachable_patterns)]
            _ => false,
        }
    }

    /// The fastest ISA this CPU supports.
    pub fn best() -> Isa {
        Isa::ALL
            .into_iter()
            .find(|isa| isa.is_supported())
            .unwrap_or(Isa::Scalar)
    }

    /// Every ISA this CPU supports (always includes [`Isa::Scalar`]).
    pub fn supported() -> Vec<Isa> {
        Isa::ALL
            .into_iter()
            .filter(|isa| isa.is_supported())
            .collect()
    }

    /// Parses an ISA name and checks the CPU supports it.
    pub fn parse(name: &str) -> Result<Isa> {
        let isa = match name.trim().to_ascii_lowercase().as_str() {
            "scalar" => Isa::Scalar,
            "avx2" => Isa::Avx2,
            "neon" => Isa::Neon,
            _ => return Err(KernelError::IsaUnknown(name.to_string())),
        };
        if isa.is_supported() {
            Ok(isa)
        } else {
            Err(KernelError::IsaUnsupported(isa.name()))
        }
    }

    /// The ISA named by `LUTRA_ISA`, or the best supported one when it is unset or empty.
    pub fn from_env() -> Result<Isa> {
        match std::env::var("LUTRA_ISA") {
            Ok(value) if !value.trim().is_empty() => Isa::parse(&value),
            _ => Ok(Isa::best()),
        }
    }
}

/// Whether this x86-64 CPU has `vpdpbusd` on 512- and 256-bit vectors (AVX-512 F, BW, VL and
/// VNNI): the int8 dot GEMM and the int8 GEMV multiply with it where it does.
#[cfg(target_arch = "x86_64")]
pub(crate) fn has_avx512_vnni() -> bool {
    is_x86_feature_detected!("avx512f")
        && is_x86_feature_detected!("avx512bw")
        && is_x86_feature_detected!("avx512vl")
        && is_x86_feature_detected!("avx512vnni")
}

impl std::fmt::Display for Isa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scalar_is_always_supported_and_best_is_supported() {
        assert!(Isa::Scalar.is_supported());
        assert!(Isa::best().is_supported());
        assert!(Isa::supported().contains(&Isa::Scalar));
    }

    #[test]
    fn native_simd_is_detected() {
        // Printed so CI logs show which paths the kernel tests exercise on this machine.
        println!("lutra-kernels: supported ISAs here: {:?}", Isa::supported());
        #[cfg(target_arch = "aarch64")]
        assert!(Isa::Neon.is_supported(), "every aarch64 CPU has NEON");
        #[cfg(target_arch = "aarch64")]
        assert_eq!(Isa::best(), Isa::Neon);
    }

    #[test]
    fn parse_rejects_unknown_and_unsupported() {
        assert!(matches!(
            Isa::parse("sse9"),
            Err(KernelError::IsaUnknown(_))
        ));
        assert_eq!(Isa::parse("Scalar").unwrap(), Isa::Scalar);
        for isa in Isa::ALL {
            match Isa::parse(isa.name()) {
                Ok(parsed) => assert!(parsed.is_supported()),
                Err(e) => assert!(matches!(e, KernelError::IsaUnsupported(_))),
            }
        }
    }
}
