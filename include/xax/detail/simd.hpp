#pragma once
// Infrastructure for xax's run-time dispatched SIMD kernels.
//
// A header-only library cannot assume its users compile with -march=native, so each x86 kernel is compiled
// for its instruction set with a function-level target attribute and chosen at run time from cpu_features().
// A build for baseline x86-64 is therefore as fast as a native one, and a native build still runs on an
// older CPU in the same family. Where the compiler has no target attributes (MSVC) or the CPU is not x86,
// only the portable kernels exist.

#include <cstddef>
#include <span>
#include <xax/utils/platform.hpp>

#if (defined(__x86_64__) || defined(__i386__)) && (defined(__GNUC__) || defined(__clang__))
#define XAX_X86_KERNELS 1
#include <immintrin.h>
// AVX2 level: 256-bit integer and float vectors plus the F16C conversions (every AVX2 CPU has F16C).
#define XAX_TARGET_AVX2 __attribute__((target("avx2,fma,f16c")))
// AVX-512 level: F for the arithmetic and conversions, BW and VL for 16-bit lanes and masked 16-bit loads
// and stores on tails, DQ for vfpclassps (spotting NaN and subnormal lanes in one instruction). Every AVX-512
// CPU since Skylake-SP has all four.
#define XAX_TARGET_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")))
// AVX-512 with the bf16 conversion instruction (vcvtne2ps2bf16): Cooper Lake, Sapphire Rapids, Zen 4 and
// later.
#define XAX_TARGET_AVX512_BF16 \
  __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,avx2,fma,f16c")))
// GCC 12.1-12.2 report their own _mm*_undefined_* helpers (`__m512i __Y = __Y;`) as uninitialised once
// inlined into a kernel (GCC bug 105593, fixed in 12.3), which -Werror turns into a build failure for users.
#if defined(__GNUC__) && !defined(__clang__)
#define XAX_SIMD_DIAGNOSTICS_BEGIN                                                     \
  _Pragma("GCC diagnostic push") _Pragma("GCC diagnostic ignored \"-Wuninitialized\"") \
      _Pragma("GCC diagnostic ignored \"-Wmaybe-uninitialized\"")
#define XAX_SIMD_DIAGNOSTICS_END _Pragma("GCC diagnostic pop")
#else
#define XAX_SIMD_DIAGNOSTICS_BEGIN
#define XAX_SIMD_DIAGNOSTICS_END
#endif
#else
#define XAX_X86_KERNELS 0
#endif

namespace xax::detail {

/// The CPU can run kernels marked XAX_TARGET_AVX2.
constexpr bool supports_avx2_kernels(const CpuFeatures& cpu) {
  return cpu.avx2 && cpu.fma && cpu.f16c;
}

/// The CPU can run kernels marked XAX_TARGET_AVX512.
constexpr bool supports_avx512_kernels(const CpuFeatures& cpu) {
  return supports_avx2_kernels(cpu) && cpu.avx512f && cpu.avx512bw && cpu.avx512vl && cpu.avx512dq;
}

/// The CPU can run kernels marked XAX_TARGET_AVX512_BF16.
constexpr bool supports_avx512_bf16_kernels(const CpuFeatures& cpu) {
  return supports_avx512_kernels(cpu) && cpu.avx512_bf16;
}

/// Every CPU runs the portable kernels.
constexpr bool supports_portable_kernels(const CpuFeatures&) {
  return true;
}

/// One implementation of an operation: its name (for tests and benchmark labels), whether this CPU can run it
/// and the function itself, optionally also in a form whose stores bypass the caches (for outputs far larger
/// than them). Each operation lists its kernels best first and ends with a portable one, so the first
/// supported entry is the one to use.
template <class Function>
struct Kernel {
  const char* name;
  bool (*supported)(const CpuFeatures&);
  Function* run;
  Function* run_streaming = nullptr;
};

/// The first kernel in `kernels` that `cpu` supports. The last entry of every list is portable, so one is
/// always found.
template <class Function>
constexpr const Kernel<Function>& best_kernel(std::span<const Kernel<Function>> kernels,
                                              const CpuFeatures& cpu) {
  for (const Kernel<Function>& kernel : kernels) {
    if (kernel.supported(cpu)) return kernel;
  }
  return kernels.back();
}

}  // namespace xax::detail
