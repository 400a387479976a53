#pragma once
// Which library kernels multiply half-precision pairs natively. A half matmul goes to a library kernel only
// where that kernel uses the CPU's native half dot products; everywhere else xax widens panels to fp32 and
// runs the fp32 GEMM, which is never slower than fp32 itself. The rule is read off the implementation name
// oneDNN reports (primitive_desc::impl_info_str(), "<kind>:<isa>"), because the name is what differs between
// a native kernel and an emulation of the same product:
//   brg:avx512_core_bf16, brg:avx512_core_amx      bf16 on vdpbf16ps / AMX tiles: native
//   brg:avx512_core_fp16, brg:avx512_core_amx_fp16 fp16 (and bf16) on AVX512-FP16 / AMX-FP16: native
//   gemm:jit, brg:avx512_core, ref:any            bf16 emulated by shifts into fp32 FMAs, or scalar code: not
// Measured on a Sapphire Rapids capped at AVX512_CORE (issue 12): oneDNN's emulated bf16 `gemm:jit` ran at 33
// GFLOP/s against 127 for its own fp32 kernel, which made `mixed` 4.2x slower than fp32.

#include <string_view>
#include <xax/utils/dtype.hpp>

namespace xax::detail {

/// Whether a kernel oneDNN names `implementation` multiplies `input` pairs natively (fp32 accumulation on the
/// CPU's half dot-product instructions or tiles). Only bfloat16 and float16 inputs can be native.
constexpr bool native_half_kernel(std::string_view implementation, DType input) {
  const std::size_t colon = implementation.find(':');
  const std::string_view kind = implementation.substr(0, colon);
  if (colon == std::string_view::npos || kind.starts_with("ref") || kind.starts_with("gemm")) return false;
  const std::string_view isa = implementation.substr(colon + 1);
  const auto names = [isa](std::string_view feature) { return isa.find(feature) != std::string_view::npos; };
  switch (input) {
    case DType::bfloat16:
      // AVX512-FP16 machines (and their oneDNN ISA names) include AVX512_BF16; AMX without a suffix is
      // AMX-BF16.
      return names("bf16") || names("amx") || names("fp16");
    case DType::float16:
      return names("fp16");
    case DType::float32:
    case DType::float64:
      break;
  }
  return false;
}

}  // namespace xax::detail
