#pragma once
/// \file
/// What the CPU offers for half precision, detected at run time (cpuid on x86, hwcaps on Arm Linux), and
/// capped by the `XAX_MAX_CPU_ISA` environment variable.
///
/// Standing in for another CPU class. `XAX_MAX_CPU_ISA` takes oneDNN's `ONEDNN_MAX_CPU_ISA` values (SSE41,
/// AVX, AVX2, AVX2_VNNI, AVX512_CORE, AVX512_CORE_VNNI, AVX512_CORE_BF16, AVX512_CORE_FP16, AVX512_CORE_AMX,
/// AVX512_CORE_AMX_FP16, ALL; case-insensitive, as oneDNN reads them) and hides every feature above that
/// class from cpu_features(), so half_dtype(), the `mixed` preset, the matmul dispatch and xax's own SIMD
/// kernels all behave as on a CPU of that class:
///
///     ONEDNN_MAX_CPU_ISA=AVX512_CORE XAX_MAX_CPU_ISA=AVX512_CORE ./train   # a Skylake-SP / Cascade Lake
///
/// A cap can only take features away: capping above what the CPU has changes nothing. An unknown value makes
/// cpu_features() throw ConfigError (oneDNN silently ignores one, which would measure the wrong class).

#include <algorithm>
#include <array>
#include <cctype>
#include <cstdlib>
#include <string>
#include <string_view>
#include <xax/utils/error.hpp>

#if defined(__x86_64__) || defined(__i386__)
#include <cpuid.h>
#endif
#if defined(__aarch64__) && defined(__linux__)
#include <sys/auxv.h>
#endif

namespace xax {

/// Instruction-set features relevant to mixed precision. Only features the OS has enabled (XSAVE state)
/// count.
struct CpuFeatures {
  bool avx2 = false;
  bool fma = false;
  bool f16c = false;  ///< x86 fp16<->fp32 conversions
  bool avx512f = false;
  bool avx512bw = false;
  bool avx512vl = false;
  bool avx512dq = false;     ///< vfpclassps: classifies NaN/subnormal lanes in one instruction
  bool avx512_bf16 = false;  ///< vdpbf16ps: bf16 dot products accumulated in fp32
  bool avx512_fp16 = false;  ///< native fp16 arithmetic
  bool amx_bf16 = false;
  bool amx_fp16 = false;
  bool arm_bf16 = false;  ///< Armv8.6 BF16 (BFDOT/BFMMLA)
  bool arm_fp16 = false;  ///< Armv8.2 FP16 arithmetic

  /// True where the CPU multiplies bf16 pairs natively and accumulates in fp32.
  [[nodiscard]] constexpr bool native_bf16_dot() const { return avx512_bf16 || amx_bf16 || arm_bf16; }
  /// True where the CPU has native fp16 arithmetic.
  [[nodiscard]] constexpr bool native_fp16_math() const { return avx512_fp16 || amx_fp16 || arm_fp16; }

  /// A one-line description such as "x86-64: avx2 fma f16c avx512f avx512bw avx512vl avx512_bf16".
  [[nodiscard]] std::string str() const {
    std::string out;
#if defined(__x86_64__) || defined(__i386__)
    out = "x86-64:";
#elif defined(__aarch64__)
    out = "aarch64:";
#else
    out = "cpu:";
#endif
    const auto add = [&out](bool present, const char* name) {
      if (present) (out += ' ') += name;
    };
    add(avx2, "avx2");
    add(fma, "fma");
    add(f16c, "f16c");
    add(avx512f, "avx512f");
    add(avx512bw, "avx512bw");
    add(avx512vl, "avx512vl");
    add(avx512dq, "avx512dq");
    add(avx512_bf16, "avx512_bf16");
    add(avx512_fp16, "avx512_fp16");
    add(amx_bf16, "amx_bf16");
    add(amx_fp16, "amx_fp16");
    add(arm_bf16, "bf16");
    add(arm_fp16, "fp16");
    if (out.back() == ':') out += " (no half-precision features)";
    return out;
  }

  friend bool operator==(const CpuFeatures&, const CpuFeatures&) = default;
};

/// The CPU classes `XAX_MAX_CPU_ISA` can cap detection at, in increasing order (oneDNN's names and order).
enum class CpuIsa {
  sse41,
  avx,
  avx2,
  avx2_vnni,
  avx512_core,
  avx512_core_vnni,
  avx512_core_bf16,
  avx512_core_fp16,
  avx512_core_amx,
  avx512_core_amx_fp16,
  all,
};

namespace detail {
struct CpuIsaName {
  CpuIsa isa;
  std::string_view name;
};
inline constexpr std::array<CpuIsaName, 11> cpu_isa_names{{
    {CpuIsa::sse41, "SSE41"},
    {CpuIsa::avx, "AVX"},
    {CpuIsa::avx2, "AVX2"},
    {CpuIsa::avx2_vnni, "AVX2_VNNI"},
    {CpuIsa::avx512_core, "AVX512_CORE"},
    {CpuIsa::avx512_core_vnni, "AVX512_CORE_VNNI"},
    {CpuIsa::avx512_core_bf16, "AVX512_CORE_BF16"},
    {CpuIsa::avx512_core_fp16, "AVX512_CORE_FP16"},
    {CpuIsa::avx512_core_amx, "AVX512_CORE_AMX"},
    {CpuIsa::avx512_core_amx_fp16, "AVX512_CORE_AMX_FP16"},
    {CpuIsa::all, "ALL"},
}};
}  // namespace detail

/// oneDNN's spelling of `isa`: "AVX2", "AVX512_CORE_BF16", "ALL", ...
constexpr std::string_view cpu_isa_name(CpuIsa isa) {
  for (const auto& entry : detail::cpu_isa_names) {
    if (entry.isa == isa) return entry.name;
  }
  return "invalid CpuIsa";
}

/// Parses an `XAX_MAX_CPU_ISA` value. Case-insensitive, as oneDNN reads `ONEDNN_MAX_CPU_ISA`; an empty value
/// means no cap (ALL). Throws ConfigError naming the value and the accepted ones for anything else.
inline CpuIsa parse_cpu_isa(std::string_view text) {
  if (text.empty()) return CpuIsa::all;
  std::string upper(text);
  std::transform(upper.begin(), upper.end(), upper.begin(),
                 [](unsigned char c) { return static_cast<char>(std::toupper(c)); });
  for (const auto& entry : detail::cpu_isa_names) {
    if (entry.name == upper) return entry.isa;
  }
  std::string accepted;
  for (const auto& entry : detail::cpu_isa_names) {
    if (!accepted.empty()) accepted += ", ";
    accepted += entry.name;
  }
  throw ConfigError("XAX_MAX_CPU_ISA: unknown CPU class '" + std::string(text) + "'; accepted (as oneDNN's " +
                    "ONEDNN_MAX_CPU_ISA, case-insensitive): " + accepted +
                    "; unset it (or set ALL) to use everything the CPU has");
}

/// `features` as a CPU of class `isa` would report them: every feature above the class is cleared. A cap
/// never adds a feature. Arm features are not x86 classes and stay as detected.
constexpr CpuFeatures cap_cpu_features(CpuFeatures features, CpuIsa isa) {
  if (isa < CpuIsa::avx512_core_amx_fp16) features.amx_fp16 = false;
  if (isa < CpuIsa::avx512_core_amx) features.amx_bf16 = false;
  if (isa < CpuIsa::avx512_core_fp16) features.avx512_fp16 = false;
  if (isa < CpuIsa::avx512_core_bf16) features.avx512_bf16 = false;
  if (isa < CpuIsa::avx512_core) {
    features.avx512f = features.avx512bw = features.avx512vl = features.avx512dq = false;
    features.avx512_bf16 = features.avx512_fp16 = features.amx_bf16 = features.amx_fp16 = false;
  }
  if (isa < CpuIsa::avx2) features.avx2 = features.fma = false;
  if (isa < CpuIsa::avx) features.f16c = false;
  return features;
}

/// The cap `XAX_MAX_CPU_ISA` sets (ALL when unset or empty). Read once per process, like oneDNN's variable.
/// Throws ConfigError on an unknown value, on every call.
inline CpuIsa max_cpu_isa() {
  static const std::string value = [] {
    const char* text =
        std::getenv("XAX_MAX_CPU_ISA");  // NOLINT(concurrency-mt-unsafe): read once, at first use
    return std::string(text != nullptr ? text : "");
  }();
  return parse_cpu_isa(value);
}

namespace detail {

inline CpuFeatures detect_cpu_features() {
  CpuFeatures f;
#if defined(__x86_64__) || defined(__i386__)
  unsigned eax = 0, ebx = 0, ecx = 0, edx = 0;
  if (!__get_cpuid(1, &eax, &ebx, &ecx, &edx)) return f;
  const bool osxsave = (ecx >> 27) & 1u;
  const bool cpu_fma = (ecx >> 12) & 1u;
  const bool cpu_f16c = (ecx >> 29) & 1u;
  const bool cpu_avx = (ecx >> 28) & 1u;
  unsigned long long xcr0 = 0;
  if (osxsave) {
    unsigned lo = 0, hi = 0;
    __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
    xcr0 = (static_cast<unsigned long long>(hi) << 32) | lo;
  }
  const bool os_avx = (xcr0 & 0x6u) == 0x6u;                 // XMM and YMM state
  const bool os_avx512 = os_avx && (xcr0 & 0xE0u) == 0xE0u;  // opmask, ZMM_Hi256, Hi16_ZMM
  const bool os_amx = (xcr0 & 0x60000ull) == 0x60000ull;     // XTILECFG, XTILEDATA
  f.fma = os_avx && cpu_fma && cpu_avx;
  f.f16c = os_avx && cpu_f16c && cpu_avx;
  if (__get_cpuid_count(7, 0, &eax, &ebx, &ecx, &edx)) {
    const unsigned max_subleaf = eax;
    f.avx2 = os_avx && ((ebx >> 5) & 1u);
    f.avx512f = os_avx512 && ((ebx >> 16) & 1u);
    f.avx512bw = os_avx512 && ((ebx >> 30) & 1u);
    f.avx512dq = os_avx512 && ((ebx >> 17) & 1u);
    f.avx512vl = os_avx512 && ((ebx >> 31) & 1u);
    f.avx512_fp16 = os_avx512 && ((edx >> 23) & 1u);
    f.amx_bf16 = os_amx && ((edx >> 22) & 1u);
    if (max_subleaf >= 1 && __get_cpuid_count(7, 1, &eax, &ebx, &ecx, &edx)) {
      f.avx512_bf16 = os_avx512 && ((eax >> 5) & 1u);
      f.amx_fp16 = os_amx && ((eax >> 21) & 1u);
    }
  }
#elif defined(__aarch64__) && defined(__linux__)
  const unsigned long hwcap = getauxval(AT_HWCAP);
  const unsigned long hwcap2 = getauxval(AT_HWCAP2);
  f.arm_fp16 = (hwcap & (1ul << 9)) != 0 && (hwcap & (1ul << 10)) != 0;  // HWCAP_FPHP, HWCAP_ASIMDHP
  f.arm_bf16 = (hwcap2 & (1ul << 14)) != 0;                              // HWCAP2_BF16
#endif
  return f;
}

}  // namespace detail

namespace detail {
/// What the CPU itself has, detected once, before any cap.
inline const CpuFeatures& detected_cpu_features() {
  static const CpuFeatures features = detect_cpu_features();
  return features;
}
}  // namespace detail

/// The features of the CPU this process runs on, detected once and capped by `XAX_MAX_CPU_ISA` (see the file
/// comment). Throws ConfigError when `XAX_MAX_CPU_ISA` holds an unknown value.
inline const CpuFeatures& cpu_features() {
  static const CpuFeatures features = cap_cpu_features(detail::detected_cpu_features(), max_cpu_isa());
  return features;
}

namespace detail {
/// cpu_features() for code that cannot throw (kernel selection inside noexcept passes): with an unknown
/// `XAX_MAX_CPU_ISA` it falls back to the uncapped features. The same value still throws from cpu_features(),
/// which half_dtype(), policy parsing and every matmul call, so the mistake is reported where it can be.
inline const CpuFeatures& cpu_features_or_detected() noexcept {
  try {
    return cpu_features();
  } catch (...) {
    return detected_cpu_features();
  }
}
}  // namespace detail

}  // namespace xax
