#pragma once
// Element-wise passes over arrays of any floating scalar with the arithmetic in fp32.
//
// Half-precision elements are widened block by block into small stack buffers with xax's SIMD conversions,
// the float kernel runs on the block (plain loops and Eigen array expressions that the compiler vectorises),
// and results are rounded once on the way out. Large passes are split across xax's threads.

#include <xax/detail/eigen.hpp>

#include <algorithm>
#include <cstddef>
#include <type_traits>
#include <xax/detail/convert.hpp>
#include <xax/detail/parallel.hpp>

namespace xax::detail {

/// Elements per block: three float blocks (12 KiB) stay in L1 next to the data they come from.
inline constexpr std::size_t elementwise_block = 1024;

/// `out[i] = f(in[i])` computed in float: `block(const float* x, float* y, std::size_t count)` is called on
/// float blocks. `in` and `out` may be the same array.
template <class In, class Out, class Block>
void map_as_float(const In* in, Out* out, std::size_t n, const Block& block) {
  parallel_blocks(n, sizeof(In) + sizeof(Out), 64, [&](std::size_t begin, std::size_t end) noexcept {
    alignas(64) float x_buffer[elementwise_block];
    alignas(64) float y_buffer[elementwise_block];
    for (std::size_t i = begin; i < end; i += elementwise_block) {
      const std::size_t count = std::min(elementwise_block, end - i);
      const float* x = x_buffer;
      if constexpr (std::is_same_v<In, float>) {
        x = in + i;
      } else {
        convert_serial(in + i, x_buffer, count);
      }
      if constexpr (std::is_same_v<Out, float>) {
        block(x, out + i, count);
      } else {
        block(x, y_buffer, count);
        convert_serial(static_cast<const float*>(y_buffer), out + i, count);
      }
    }
  });
}

/// `out[i] = f(a[i], b[i])` computed in float: `block(const float* a, const float* b, float* y, count)`.
/// `out` may be the same array as `a` or `b`.
template <class A, class B, class Out, class Block>
void map2_as_float(const A* a, const B* b, Out* out, std::size_t n, const Block& block) {
  parallel_blocks(n, sizeof(A) + sizeof(B) + sizeof(Out), 64,
                  [&](std::size_t begin, std::size_t end) noexcept {
                    alignas(64) float a_buffer[elementwise_block];
                    alignas(64) float b_buffer[elementwise_block];
                    alignas(64) float y_buffer[elementwise_block];
                    for (std::size_t i = begin; i < end; i += elementwise_block) {
                      const std::size_t count = std::min(elementwise_block, end - i);
                      const float* x = a_buffer;
                      const float* y = b_buffer;
                      if constexpr (std::is_same_v<A, float>) {
                        x = a + i;
                      } else {
                        convert_serial(a + i, a_buffer, count);
                      }
                      if constexpr (std::is_same_v<B, float>) {
                        y = b + i;
                      } else {
                        convert_serial(b + i, b_buffer, count);
                      }
                      if constexpr (std::is_same_v<Out, float>) {
                        block(x, y, out + i, count);
                      } else {
                        block(x, y, y_buffer, count);
                        convert_serial(static_cast<const float*>(y_buffer), out + i, count);
                      }
                    }
                  });
}

}  // namespace xax::detail
