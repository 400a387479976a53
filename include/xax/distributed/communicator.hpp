#pragma once
/// \file
/// `xax::distributed::Communicator`: an MPI communicator owned or borrowed with RAII, whose errors are
/// exceptions (`xax::distributed::MpiError`, naming the call and the rank), the MPI start-up and shut-down
/// (`Environment`), and `run_or_abort`, which ends the whole job when one rank fails (DESIGN §12).
///
///     int main(int argc, char** argv) {
///       xax::distributed::Environment mpi(argc, argv);   // MPI_Init_thread ... MPI_Finalize
///       return xax::distributed::run_or_abort([&] {
///         xax::distributed::Communicator comm;           // a private duplicate of MPI_COMM_WORLD
///         ... train ...
///         return 0;
///       });
///     }
///
/// Only MPI's C API is used, so Open MPI and MPICH both build it.

#include <mpi.h>

#include <concepts>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <exception>
#include <limits>
#include <string>
#include <type_traits>
#include <utility>
#include <xax/utils/dtype.hpp>
#include <xax/utils/error.hpp>

namespace xax::distributed {

/// An MPI call failed. The message names the call, the rank (in MPI_COMM_WORLD, -1 when MPI is not running)
/// and MPI's own text for the error.
class MpiError : public Error {
 public:
  MpiError(std::string call, int rank, int code, const std::string& detail)
      : Error("MPI call " + call + " failed on rank " + std::to_string(rank) + ": " + detail),
        call_(std::move(call)),
        rank_(rank),
        code_(code) {}
  /// The MPI function that failed, e.g. "MPI_Alltoallv".
  [[nodiscard]] const std::string& call() const { return call_; }
  /// The failing process's rank in MPI_COMM_WORLD.
  [[nodiscard]] int rank() const { return rank_; }
  /// MPI's error code.
  [[nodiscard]] int code() const { return code_; }

 private:
  std::string call_;
  int rank_;
  int code_;
};

/// Whether MPI is initialised and not yet finalised, i.e. whether MPI calls may be made.
[[nodiscard]] inline bool mpi_running() {
  int initialized = 0;
  int finalized = 0;
  MPI_Initialized(&initialized);
  MPI_Finalized(&finalized);
  return initialized != 0 && finalized == 0;
}

/// This process's rank in MPI_COMM_WORLD, or -1 when MPI is not running.
[[nodiscard]] inline int world_rank() {
  if (!mpi_running()) return -1;
  int rank = -1;
  MPI_Comm_rank(MPI_COMM_WORLD, &rank);
  return rank;
}

/// MPI's text for an error code.
[[nodiscard]] inline std::string mpi_error_text(int code) {
  char text[MPI_MAX_ERROR_STRING] = {};
  int length = 0;
  if (MPI_Error_string(code, text, &length) != MPI_SUCCESS) return "MPI error code " + std::to_string(code);
  return std::string(text, static_cast<std::size_t>(length)) + " (code " + std::to_string(code) + ")";
}

/// Throws MpiError naming `call` unless `code` is MPI_SUCCESS.
inline void check_mpi(int code, const char* call) {
  if (code != MPI_SUCCESS) throw MpiError(call, world_rank(), code, mpi_error_text(code));
}

/// MPI's datatype for a scalar xax sends. bfloat16 and float16 travel as their 16 raw bits (MPI has no 16-bit
/// float type; xax never asks MPI to do arithmetic on them).
template <class T>
MPI_Datatype mpi_datatype() {
  if constexpr (std::is_same_v<T, float>) {
    return MPI_FLOAT;
  } else if constexpr (std::is_same_v<T, double>) {
    return MPI_DOUBLE;
  } else if constexpr (std::is_same_v<T, std::int64_t>) {
    return MPI_INT64_T;
  } else if constexpr (std::is_same_v<T, std::uint64_t>) {
    return MPI_UINT64_T;
  } else if constexpr (std::is_same_v<T, std::int32_t>) {
    return MPI_INT32_T;
  } else if constexpr (std::is_same_v<T, std::uint32_t>) {
    return MPI_UINT32_T;
  } else if constexpr (std::is_same_v<T, std::uint8_t> || std::is_same_v<T, std::byte> ||
                       std::is_same_v<T, char>) {
    return MPI_BYTE;
  } else if constexpr (std::is_same_v<T, bfloat16> || std::is_same_v<T, float16> ||
                       std::is_same_v<T, std::uint16_t>) {
    static_assert(sizeof(T) == 2);
    return MPI_UINT16_T;
  } else {
    static_assert(sizeof(T) == 0, "xax::distributed::mpi_datatype: no MPI datatype for this scalar");
  }
}

/// Starts MPI (MPI_Init_thread) and finalises it when destroyed, unless MPI was already running: then it
/// neither starts nor finalises it. Asks for MPI_THREAD_FUNNELED: xax calls MPI from the thread that called
/// train_step only, while its compute threads never call MPI. Throws ConfigError when MPI provides less than
/// the level asked for, whether it starts MPI (which it then finalises) or finds it running: an application
/// that started MPI with MPI_Init (MPI_THREAD_SINGLE) and accepts that asks for MPI_THREAD_SINGLE.
class Environment {
 public:
  Environment(int& argc, char**& argv, int required_thread_level = MPI_THREAD_FUNNELED) {
    start(&argc, &argv, required_thread_level);
  }
  explicit Environment(int required_thread_level = MPI_THREAD_FUNNELED) {
    start(nullptr, nullptr, required_thread_level);
  }
  ~Environment() {
    if (owns_ && mpi_running()) MPI_Finalize();
  }
  Environment(const Environment&) = delete;
  Environment& operator=(const Environment&) = delete;

  /// The thread level MPI provides (MPI_THREAD_SINGLE ... MPI_THREAD_MULTIPLE).
  [[nodiscard]] int thread_level() const { return provided_; }

 private:
  static std::string thread_level_name(int level) {
    switch (level) {
      case MPI_THREAD_SINGLE:
        return "MPI_THREAD_SINGLE";
      case MPI_THREAD_FUNNELED:
        return "MPI_THREAD_FUNNELED";
      case MPI_THREAD_SERIALIZED:
        return "MPI_THREAD_SERIALIZED";
      case MPI_THREAD_MULTIPLE:
        return "MPI_THREAD_MULTIPLE";
      default:
        return "thread level " + std::to_string(level);
    }
  }

  void start(int* argc, char*** argv, int required) {
    if (required != MPI_THREAD_SINGLE && required != MPI_THREAD_FUNNELED &&
        required != MPI_THREAD_SERIALIZED && required != MPI_THREAD_MULTIPLE) {
      throw ConfigError(
          "xax::distributed::Environment: " + thread_level_name(required) +
          " is not accepted; give MPI_THREAD_SINGLE, MPI_THREAD_FUNNELED, MPI_THREAD_SERIALIZED "
          "or MPI_THREAD_MULTIPLE");
    }
    int initialized = 0;
    MPI_Initialized(&initialized);
    if (initialized != 0) {
      MPI_Query_thread(&provided_);
    } else {
      const int code = MPI_Init_thread(argc, argv, required, &provided_);
      if (code != MPI_SUCCESS) throw MpiError("MPI_Init_thread", -1, code, "MPI could not start");
    }
    // The levels are ordered: SINGLE < FUNNELED < SERIALIZED < MULTIPLE.
    if (provided_ < required) {
      if (initialized == 0) MPI_Finalize();
      throw ConfigError("xax::distributed::Environment: MPI provides " + thread_level_name(provided_) +
                        ", less than the " + thread_level_name(required) + " asked for" +
                        (initialized != 0 ? " (MPI was started before, with that level)" : "") +
                        "; use an MPI built with thread support, or ask for less");
    }
    owns_ = initialized == 0;
  }
  bool owns_ = false;
  int provided_ = MPI_THREAD_SINGLE;
};

/// An MPI communicator with RAII and exceptions. It either owns its MPI_Comm (a duplicate, freed when the
/// Communicator is destroyed) or borrows one (never freed). Either way MPI_ERRORS_RETURN is set on it, so
/// that a failed call returns to xax, which throws MpiError, instead of MPI's default of aborting without a
/// word; on a borrowed communicator that changes the error handler the caller sees too. Move-only.
class Communicator {
 public:
  /// A private duplicate of MPI_COMM_WORLD: xax's traffic and error handler never touch the application's.
  Communicator() : Communicator(duplicate(MPI_COMM_WORLD)) {}

  /// A duplicate of `comm` (MPI_Comm_dup), owned.
  static Communicator duplicate(MPI_Comm comm) {
    require_running("Communicator::duplicate");
    MPI_Comm copy = MPI_COMM_NULL;
    check_mpi(MPI_Comm_dup(comm, &copy), "MPI_Comm_dup");
    return Communicator(copy, true);
  }
  /// `comm` itself, borrowed: the caller keeps it alive longer than this object and frees it.
  static Communicator borrow(MPI_Comm comm) {
    require_running("Communicator::borrow");
    if (comm == MPI_COMM_NULL) throw Error("xax::distributed::Communicator::borrow: got MPI_COMM_NULL");
    return Communicator(comm, false);
  }

  ~Communicator() { release(); }
  Communicator(Communicator&& other) noexcept
      : comm_(std::exchange(other.comm_, MPI_COMM_NULL)),
        owned_(std::exchange(other.owned_, false)),
        rank_(other.rank_),
        size_(other.size_) {}
  Communicator& operator=(Communicator&& other) noexcept {
    if (this != &other) {
      release();
      comm_ = std::exchange(other.comm_, MPI_COMM_NULL);
      owned_ = std::exchange(other.owned_, false);
      rank_ = other.rank_;
      size_ = other.size_;
    }
    return *this;
  }
  Communicator(const Communicator&) = delete;
  Communicator& operator=(const Communicator&) = delete;

  /// This process's rank in the communicator.
  [[nodiscard]] int rank() const { return rank_; }
  /// The number of processes in the communicator.
  [[nodiscard]] int size() const { return size_; }
  /// Whether this object owns (and will free) its MPI_Comm.
  [[nodiscard]] bool owns() const { return owned_; }
  /// The MPI_Comm, for calls xax does not wrap. Throws Error on a moved-from Communicator.
  [[nodiscard]] MPI_Comm native() const {
    if (comm_ == MPI_COMM_NULL)
      throw Error("xax::distributed::Communicator used after it was moved from; use the object it moved to");
    return comm_;
  }

  void barrier() const { check_mpi(MPI_Barrier(native()), "MPI_Barrier"); }

  /// Sends `count` elements at `data` from `root` to every rank.
  template <class T>
  void broadcast(T* data, std::size_t count, int root = 0) const {
    check_mpi(MPI_Bcast(data, as_count(count, "MPI_Bcast"), mpi_datatype<T>(), root, native()), "MPI_Bcast");
  }

  /// Every rank contributes `count` elements; every rank receives all of them, rank by rank.
  template <class T>
  void all_gather(const T* send, std::size_t count, T* receive) const {
    const int n = as_count(count, "MPI_Allgather");
    check_mpi(MPI_Allgather(send, n, mpi_datatype<T>(), receive, n, mpi_datatype<T>(), native()),
              "MPI_Allgather");
  }

  /// As all_gather with a different count per rank: rank r's `counts[r]` elements land at `offsets[r]`.
  template <class T>
  void all_gather_v(const T* send, int send_count, T* receive, const int* counts, const int* offsets) const {
    check_mpi(MPI_Allgatherv(send, send_count, mpi_datatype<T>(), receive, counts, offsets, mpi_datatype<T>(),
                             native()),
              "MPI_Allgatherv");
  }

  /// Personalised exchange: rank r sends send_counts[q] elements from send + send_offsets[q] to each q.
  template <class T>
  void all_to_all_v(const T* send, const int* send_counts, const int* send_offsets, T* receive,
                    const int* receive_counts, const int* receive_offsets) const {
    check_mpi(MPI_Alltoallv(send, send_counts, send_offsets, mpi_datatype<T>(), receive, receive_counts,
                            receive_offsets, mpi_datatype<T>(), native()),
              "MPI_Alltoallv");
  }

  /// Element-wise reduction of `count` elements over every rank, the result on every rank. Only for values
  /// whose result does not depend on the order of combination (integer sums, minima, maxima, logical ors).
  template <class T>
  void all_reduce(const T* send, T* receive, std::size_t count, MPI_Op op) const {
    check_mpi(MPI_Allreduce(send, receive, as_count(count, "MPI_Allreduce"), mpi_datatype<T>(), op, native()),
              "MPI_Allreduce");
  }

  /// Converts an element count to MPI's int, or throws Error naming `call`.
  static int as_count(std::size_t count, const char* call) {
    if (count > static_cast<std::size_t>(std::numeric_limits<int>::max())) {
      throw Error(std::string(call) + ": " + std::to_string(count) +
                  " elements exceed the 2^31 - 1 one MPI call can move; split the tensor");
    }
    return static_cast<int>(count);
  }

 private:
  Communicator(MPI_Comm comm, bool owned) : comm_(comm), owned_(owned) {
    try {
      check_mpi(MPI_Comm_set_errhandler(comm_, MPI_ERRORS_RETURN), "MPI_Comm_set_errhandler");
      check_mpi(MPI_Comm_rank(comm_, &rank_), "MPI_Comm_rank");
      check_mpi(MPI_Comm_size(comm_, &size_), "MPI_Comm_size");
    } catch (...) {
      release();
      throw;
    }
  }

  static void require_running(const char* what) {
    if (!mpi_running()) {
      throw Error(std::string("xax::distributed::") + what +
                  ": MPI is not running; create an xax::distributed::Environment (or call MPI_Init) first");
    }
  }

  void release() noexcept {
    // After MPI_Finalize a communicator can no longer be freed (nor needs to be).
    if (owned_ && comm_ != MPI_COMM_NULL && mpi_running()) MPI_Comm_free(&comm_);
    comm_ = MPI_COMM_NULL;
    owned_ = false;
  }

  MPI_Comm comm_ = MPI_COMM_NULL;
  bool owned_ = false;
  int rank_ = 0;
  int size_ = 1;
};

/// Ends the whole job: prints `message` with this process's rank to stderr and calls MPI_Abort on
/// MPI_COMM_WORLD, which stops every rank (so none waits forever in a collective for the failed one).
[[noreturn]] inline void abort_job(const std::string& message, int exit_code = 1) noexcept {
  int size = 0;
  if (mpi_running()) MPI_Comm_size(MPI_COMM_WORLD, &size);
  std::fprintf(stderr, "xax: rank %d of %d failed: %s\nxax: ending the whole job (MPI_Abort)\n", world_rank(),
               size, message.c_str());
  std::fflush(stderr);
  if (mpi_running()) MPI_Abort(MPI_COMM_WORLD, exit_code);
  std::_Exit(exit_code);
}

/// Runs `body()` and returns what it returns; if it throws, ends the whole job with the exception's message
/// (abort_job). Without this, a rank that throws (bad data, LossScaleError) exits while the others wait in
/// their next collective for ever. Exceptions that escape elsewhere (other threads) end the job through the
/// terminate handler this installs.
template <class F>
requires std::invocable<F&>
int run_or_abort(F&& body) {
  std::set_terminate([] {
    std::string what = "terminate called";
    if (const std::exception_ptr current = std::current_exception()) {
      try {
        std::rethrow_exception(current);
      } catch (const std::exception& error) {
        what = error.what();
      } catch (...) {
        what = "an exception that is not a std::exception";
      }
    }
    abort_job(what);
  });
  try {
    if constexpr (std::is_void_v<std::invoke_result_t<F&>>) {
      body();
      return 0;
    } else {
      return static_cast<int>(body());
    }
  } catch (const std::exception& error) {
    abort_job(error.what());
  } catch (...) {
    abort_job("an exception that is not a std::exception");
  }
}

}  // namespace xax::distributed
