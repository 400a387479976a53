#pragma once
// Every xax header includes Eigen through this file, so that Eigen's fp16 conversions are configured first.
//
// Eigen 3.4 enables its F16C conversions with
//   #if defined(__F16C__) && (... (!defined(EIGEN_COMP_CLANG) || EIGEN_COMP_CLANG>=380))
// but EIGEN_COMP_CLANG is always defined (to 0 under GCC), so GCC never gets EIGEN_HAS_FP16_C and every
// Eigen::half conversion runs a ~20-instruction software routine (0.33 GFLOP/s half GEMM instead of 13.6).
// Defining the macro ourselves when the target has F16C restores the hardware path without asking users for
// anything. If Eigen was already included before xax, it is too late for Eigen's own inline functions; xax's
// own conversion kernels (xax/ops/convert.hpp) do not depend on this and are fast either way.
#if defined(__F16C__) && defined(__GNUC__) && !defined(__clang__) && !defined(EIGEN_HAS_FP16_C) && \
    !defined(EIGEN_CORE_H)
#define EIGEN_HAS_FP16_C
#endif

// GCC 12.1-12.2 report their own AVX-512 helpers (`__m512 __Y = __Y;` in _mm512_undefined_ps) as possibly
// uninitialised once Eigen's packet code inlines them (GCC bug 105593, fixed in 12.3), so any translation
// unit using Eigen with -march=native -O2 and -Werror fails to build. The warning is attributed to the
// intrinsics header, so silencing it where that header is first read fixes it for every user of Eigen in the
// translation unit, and for nothing else.
#if defined(__GNUC__) && !defined(__clang__) && (defined(__x86_64__) || defined(__i386__))
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#include <immintrin.h>
#pragma GCC diagnostic pop
#endif

#include <Eigen/Core>
#include <type_traits>

namespace xax::detail {

/// Resizes a plain Eigen output to rows x cols where its compile-time sizes allow that shape, and leaves it
/// alone otherwise, so that the caller's shape check reports a ShapeError: resizing a fixed-size matrix to
/// another shape (a column vector to a row), or a dynamic one past its compile-time maximum, is an Eigen
/// assertion (without assertions, a write past the inline storage). Expressions are left alone.
template <class Out>
void resize_plain_if_possible(Out& out, Eigen::Index rows, Eigen::Index cols) {
  if constexpr (std::is_same_v<typename Out::PlainObject, Out>) {
    constexpr auto allows = [](Eigen::Index wanted, int fixed, int max) {
      return (fixed == Eigen::Dynamic || fixed == wanted) && (max == Eigen::Dynamic || wanted <= max);
    };
    if (allows(rows, Out::RowsAtCompileTime, Out::MaxRowsAtCompileTime) &&
        allows(cols, Out::ColsAtCompileTime, Out::MaxColsAtCompileTime)) {
      out.resize(rows, cols);
    }
  }
}

}  // namespace xax::detail
