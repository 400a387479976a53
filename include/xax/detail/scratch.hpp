#pragma once
// Grow-only scratch memory for the compute path (matmul operand conversions, oneDNN scratchpads).
//
// A train step calls the same operations with the same shapes every time, so a buffer that only ever grows
// is allocated once and then reused: no allocation, and above all no first-touch page faults, after the
// first step (a fresh 256 MiB buffer costs ~116 ms of page faults on this machine kind; PERFORMANCE.md).

#include <cstddef>
#include <memory>
#include <new>
#include <type_traits>

namespace xax::detail {

/// Uninitialised, 64-byte aligned storage for `T` that keeps its largest size.
template <class T>
class ScratchBuffer {
  static_assert(std::is_trivially_copyable_v<T> && std::is_trivially_destructible_v<T>,
                "xax: scratch buffers hold plain numbers only");

 public:
  /// At least `count` elements; the contents are unspecified (kept from earlier use when not reallocated).
  [[nodiscard]] T* get(std::size_t count) {
    if (count > capacity_) {
      data_.reset(static_cast<T*>(::operator new(count * sizeof(T), alignment)));
      capacity_ = count;
    }
    return data_.get();
  }

  [[nodiscard]] std::size_t capacity() const { return capacity_; }

  /// Frees the storage, so that a buffer sized for one workload does not stay resident during the next.
  void release() {
    data_.reset();
    capacity_ = 0;
  }

 private:
  static constexpr std::align_val_t alignment{64};
  struct Free {
    void operator()(T* p) const { ::operator delete(p, alignment); }
  };
  std::unique_ptr<T, Free> data_;
  std::size_t capacity_ = 0;
};

}  // namespace xax::detail
