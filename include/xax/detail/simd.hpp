#pragma once
// Infrastructure for xax's run-time dispatched SIMD kernels.
//
// A header-only library cannot assume its users compile with -march=native, so each x86 kernel is compiled
// for its instruction set with a function-level target attribute and chosen at run time from cpu_features().
// A build for baseline x86-64 is therefore as fast as a native one, and a native build still runs on an
// older CPU in the same family. Where the compiler has no target attributes (MSVC) or the CPU is not x86,
// only the portable kernels exist.

#include <algorithm>
#include <cstddef>
#include <cstdint>
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

#if XAX_X86_KERNELS
XAX_SIMD_DIAGNOSTICS_BEGIN

// ---------------------------------------------------------------------------------------------------------------
// The loop shared by every AVX-512 kernel over an array: a masked head until the stores reach a cache line,
// whole lines, a masked tail.

/// A mask of the low `count` lanes (count <= 16).
XAX_TARGET_AVX512 inline __mmask16 low_lanes16(std::size_t count) {
  return static_cast<__mmask16>((1u << count) - 1u);
}

/// Elements before `pointer` reaches a 64-byte boundary (at most n).
template <class T>
std::size_t elements_to_cache_line(const T* pointer, std::size_t n) {
  const auto misalignment = reinterpret_cast<std::uintptr_t>(pointer) % 64;
  return std::min(n, misalignment == 0 ? std::size_t{0} : (64 - misalignment) / sizeof(T));
}

/// Stores one cache line at a 64-byte aligned address. A streaming store bypasses the caches: for a
/// destination much larger than the last-level cache it saves reading every line before writing it.
template <bool Streaming>
XAX_TARGET_AVX512 inline void store_line(void* aligned, __m512i value) {
  if constexpr (Streaming) {
    _mm512_stream_si512(static_cast<__m512i*>(aligned), value);
  } else {
    _mm512_store_si512(aligned, value);
  }
}

/// Streaming stores are weakly ordered: fence them before another thread may read what they wrote.
template <bool Streaming>
XAX_TARGET_AVX512 inline void finish_stores() {
  if constexpr (Streaming) _mm_sfence();
}

/// Runs an AVX-512 kernel over elements [0, n) of arrays whose stores go to `stored` (the destination, or
/// the array updated in place). `masked(i, count)` handles elements [i, i + count) for count <= 16 with
/// masked loads and stores: first until `stored + i` sits on a 64-byte boundary, then for the tail.
/// `whole(i)` handles the 32 elements from i in between, whose stores to `stored` are aligned and fill whole
/// cache lines (ready for store_line). With Streaming, the stores are fenced at the end (finish_stores).
///
/// Both operations must carry their kernel's XAX_TARGET_* attribute (lambdas too: GCC does not give a lambda
/// the target of the function it is written in). This loop is always inlined into the kernel, so that GCC and
/// Clang then inline the operations, also ones needing more than AVX-512F/BW/VL/DQ (such as AVX512_BF16),
/// and keep any accumulators they capture by reference in registers.
template <bool Streaming, class T, class Masked, class Whole>
[[gnu::always_inline]] XAX_TARGET_AVX512 inline void for_each_line_avx512(const T* stored, std::size_t n,
                                                                          Masked&& masked, Whole&& whole) {
  std::size_t i = 0;
  for (const std::size_t head = elements_to_cache_line(stored, n); i < head;) {
    const std::size_t count = std::min<std::size_t>(16, head - i);
    masked(i, count);
    i += count;
  }
  for (; i + 32 <= n; i += 32) whole(i);
  for (; i < n; i += 16) masked(i, std::min<std::size_t>(16, n - i));
  finish_stores<Streaming>();
}

/// Runs an AVX2 kernel over elements [0, n): `whole(i)` on the 16 elements from i while 16 remain, then
/// `rest(i, n - i)` on the remaining fewer than 16 (AVX2 has no masked 16-bit loads and stores).
template <class Whole, class Rest>
[[gnu::always_inline]] XAX_TARGET_AVX2 inline void for_each_line_avx2(std::size_t n, Whole&& whole,
                                                                      Rest&& rest) {
  std::size_t i = 0;
  for (; i + 16 <= n; i += 16) whole(i);
  rest(i, n - i);
}

XAX_SIMD_DIAGNOSTICS_END
#endif  // XAX_X86_KERNELS

}  // namespace xax::detail
