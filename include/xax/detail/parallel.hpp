#pragma once
// Splitting one memory-bound pass (a conversion, a fused unscale-and-check) across xax's threads.
//
// A pass over memory is split into one contiguous block per thread: each thread then streams through its own
// pages, which is what the hardware prefetchers handle best, and a single fork/join is paid per pass.

#include <cstddef>
#include <exception>
#include <span>
#include <type_traits>
#include <xax/utils/threads.hpp>

#if defined(_OPENMP)
#include <omp.h>
#endif

namespace xax::detail {

/// Passes touching fewer bytes than this stay on the calling thread: waking a second thread costs a few
/// microseconds, about the time one core needs to stream this much.
inline constexpr std::size_t parallel_min_bytes = std::size_t{1} << 18;

/// The number of threads a pass touching `bytes` bytes should use: 1 below parallel_min_bytes, without
/// OpenMP, and inside an enclosing parallel region (nesting would oversubscribe the cores).
inline int threads_for_bytes(std::size_t bytes) {
#if defined(_OPENMP)
  if (bytes < parallel_min_bytes || omp_in_parallel()) return 1;
  return num_threads();
#else
  static_cast<void>(bytes);
  return 1;
#endif
}

/// The start of block `index` when [0, n) is cut into `count` near-equal blocks, rounded down to a multiple
/// of `grain` so that neighbouring blocks do not share cache lines. Both neighbours compute the same
/// boundary, so the blocks always partition [0, n).
constexpr std::size_t block_start(std::size_t n, std::size_t index, std::size_t count, std::size_t grain) {
  if (index >= count) return n;
  // floor(n * index / count) without overflowing n * index.
  const std::size_t exact = n / count * index + n % count * index / count;
  return exact / grain * grain;
}

/// Calls `f(begin, end)` on blocks that partition [0, n), one block per thread, and returns whether every
/// call returned true. `bytes_per_element` (the memory traffic per element) decides whether threads are worth
/// waking. `f` must not throw: an exception cannot leave an OpenMP region.
template <class F>
bool parallel_blocks_all(std::size_t n, std::size_t bytes_per_element, [[maybe_unused]] std::size_t grain,
                         F&& f) {
  static_assert(std::is_nothrow_invocable_r_v<bool, F&, std::size_t, std::size_t>,
                "xax: a parallel block function must be noexcept and return bool");
  const int threads = threads_for_bytes(n * bytes_per_element);
  if (threads <= 1) return f(std::size_t{0}, n);
  bool all = true;
#if defined(_OPENMP)
#pragma omp parallel num_threads(threads) reduction(&& : all)
  {
    const auto count = static_cast<std::size_t>(omp_get_num_threads());
    const auto index = static_cast<std::size_t>(omp_get_thread_num());
    const std::size_t begin = block_start(n, index, count, grain);
    const std::size_t end = block_start(n, index + 1, count, grain);
    if (begin < end) all = f(begin, end);
  }
#endif
  return all;
}

/// parallel_blocks_all for a pass with no result.
template <class F>
void parallel_blocks(std::size_t n, std::size_t bytes_per_element, std::size_t grain, F&& f) {
  static_assert(std::is_nothrow_invocable_v<F&, std::size_t, std::size_t>,
                "xax: a parallel block function must be noexcept");
  parallel_blocks_all(n, bytes_per_element, grain, [&f](std::size_t begin, std::size_t end) noexcept {
    f(begin, end);
    return true;
  });
}

/// parallel_blocks for a block function that may throw. An exception cannot leave an OpenMP region, so the
/// first one thrown is kept, the other blocks still run, and it is rethrown after the join.
template <class F>
void parallel_blocks_rethrowing(std::size_t n, std::size_t bytes_per_element, std::size_t grain, F&& f) {
  std::exception_ptr failure;
  parallel_blocks(n, bytes_per_element, grain, [&](std::size_t begin, std::size_t end) noexcept {
    try {
      f(begin, end);
    } catch (...) {
#if defined(_OPENMP)
#pragma omp critical(xax_parallel_blocks_failure)
#endif
      if (!failure) failure = std::current_exception();
    }
  });
  if (failure) std::rethrow_exception(failure);
}

/// The size of one array in a multi-array pass: its elements, and the bytes of memory traffic per element.
struct ArrayExtent {
  std::size_t size;
  std::size_t bytes_per_element;
};

/// One pass over many arrays (the leaves of a tree) with a single fork/join: the arrays are laid end to end,
/// split by bytes into one contiguous share per thread, and `f(item, begin, end)` is called for every piece
/// of an array, where `extent(item)` gives the array's ArrayExtent. Cuts inside an array fall on multiples of
/// `grain` elements. Returns the AND of the results; every piece is processed regardless. A per-array
/// parallel region instead pays one fork/join per array, and on a loaded machine each join waits for a
/// descheduled thread.
template <class Item, class Extent, class F>
bool parallel_pieces_all(std::span<const Item> items, Extent&& extent, std::size_t grain, F&& f) {
  std::size_t total_bytes = 0;
  for (const Item& item : items) {
    const ArrayExtent e = extent(item);
    total_bytes += e.size * e.bytes_per_element;
  }
  return parallel_blocks_all(total_bytes, 1, 1, [&](std::size_t byte_begin, std::size_t byte_end) noexcept {
    bool all = true;
    std::size_t offset = 0;
    for (const Item& item : items) {
      const ArrayExtent e = extent(item);
      const std::size_t bytes = e.size * e.bytes_per_element;
      // Where a thread boundary at global byte `cut` falls in this array. Both threads around a boundary
      // compute the same element, so the pieces partition every array.
      const auto element_at = [&](std::size_t cut) -> std::size_t {
        if (cut <= offset) return 0;
        if (cut >= offset + bytes) return e.size;
        return (cut - offset) / e.bytes_per_element / grain * grain;
      };
      const std::size_t begin = element_at(byte_begin);
      const std::size_t end = element_at(byte_end);
      if (begin < end) all = f(item, begin, end) && all;
      offset += bytes;
    }
    return all;
  });
}

}  // namespace xax::detail
