#pragma once
/// \file
/// What the CPU offers for half precision, detected at run time (cpuid on x86, hwcaps on Arm Linux).

#include <string>

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

/// The features of the CPU this process runs on, detected once.
inline const CpuFeatures& cpu_features() {
  static const CpuFeatures features = detail::detect_cpu_features();
  return features;
}

}  // namespace xax
