#pragma once
/// \file
/// `xax::distributed::GradientReducer`: sums the gradients of one data-parallel step over every process, in
/// fp32, so that every process ends with the same bits (DESIGN §12), and `broadcast_tree`, which starts every
/// process from rank 0's parameters.
///
/// How a step's gradients are reduced (one all-to-all, a local fp32 sum, one all-gather):
/// - The flattened gradient (N floats, tree order) is cut into one chunk per rank; rank q owns chunk q.
/// - Every process sends chunk q of each of its contributions to rank q (MPI_Alltoallv), on the wire as fp32
///   or bfloat16.
/// - Rank q adds the contributions of its chunk in fp32, in the global order of the micro-batches (rank 0's
///   first, then rank 1's, ...), element by element, and rounds the sum to the wire type once.
/// - An all-gather (MPI_Allgatherv) hands every rank every chunk's sum. Every rank therefore holds the same
///   bits, computed by one owner, and takes the same skip decision, scale and counters from them; no MPI
///   reduction order is trusted to agree across ranks.
///
/// Deterministic mode (the default) sends every micro-batch's gradients as a contribution of its own, so that
/// each element is the sum of the step's S micro-batch gradients added left to right in micro-batch order:
/// the same additions, in the same order, whatever the number of processes, and the same as a single process
/// accumulating those S micro-batches in xax::TrainStep. The final masters are then bit-identical for 1, 2
/// and 4 ranks. It costs S/W contributions on the wire per rank instead of one (see README). The fast mode
/// sums a process's micro-batches locally first and sends one contribution.
///
/// Buckets (ReducerOptions::bucket_size, in elements; 0 = one bucket): the flat gradient is reduced bucket
/// after bucket, each with the all-to-all, sum and all-gather above over its own elements. The receive, sum
/// and gather buffers (and the fast mode's bf16 staging) then hold one bucket instead of the whole gradient,
/// and every MPI message is at most a bucket. Not bounded by it: what must exist before the first exchange,
/// i.e. in deterministic mode the step's micro-batch gradients in the wire type (S/W x N), in fast mode the
/// local fp32 sum (N floats, like TrainStep's own accumulator). Each element's sum is the same additions in
/// the same order whatever bucket it falls in, so results are bit-identical for every bucket size. The
/// buckets are exchanged after the backward, not overlapped with it: TrainStep computes a micro-batch's
/// gradients in one loss_and_grads call, so no bucket is ready before the whole backward is done.
///
/// With the bfloat16 wire every element is rounded to bf16 when sent and its sum is accumulated in fp32 and
/// rounded to bf16 once (not at every hop, as a ring all-reduce with a bf16 MPI_Op or NCCL rounds it), which
/// halves the bytes of both exchanges.

#include <algorithm>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <span>
#include <string>
#include <type_traits>
#include <vector>
#include <xax/detail/random.hpp>
#include <xax/distributed/communicator.hpp>
#include <xax/ops/convert.hpp>
#include <xax/task/train_step.hpp>
#include <xax/utils/dtype.hpp>
#include <xax/utils/error.hpp>
#include <xax/utils/tree.hpp>

namespace xax::distributed {

/// How gradients are reduced.
struct ReducerOptions {
  /// The type gradients travel in: DType::float32 (exact sums of fp32 gradients) or DType::bfloat16 (half
  /// the bytes; each element summed in fp32 and rounded once).
  DType wire = DType::float32;
  /// Each micro-batch's gradients travel on their own and are summed in micro-batch order, so that results
  /// do not depend on the number of processes (bit-identical masters for 1, 2, 4 ranks). Off: each process
  /// sums its micro-batches first and sends one contribution (fewer bytes, same result for a fixed world).
  bool deterministic = true;
  /// Gradient elements exchanged per bucket (0: the whole gradient in one bucket). The flat gradient is
  /// reduced bucket after bucket, each with its own all-to-all, sum and all-gather, so the receive, sum and
  /// gather buffers hold at most this many elements instead of the whole model (see the file comment for
  /// what is not bounded). Counted in elements, not bytes, so that a config cuts the gradient at the same
  /// places whatever the wire type; the results are bit-identical for every bucket size.
  std::size_t bucket_size = 0;
};

/// What the reducer did, for reports: communication time and bytes.
struct ReductionStats {
  std::int64_t reductions = 0;       ///< steps reduced
  double seconds = 0;                ///< wall time inside reduce(): exchanges and the fp32 sums
  std::size_t elements = 0;          ///< gradient elements per step (N)
  std::size_t wire_bytes_last = 0;   ///< bytes this rank sent to other ranks in the last step
  std::size_t wire_bytes_total = 0;  ///< the same, summed over all steps
  std::size_t buckets_last = 0;      ///< buckets the last step's gradient was exchanged in
  /// Bytes of the reducer's buffers after the last step (their capacities): the staged micro-batch
  /// gradients (deterministic mode) or local sum (fast mode), and the bucket-bounded receive, sum and
  /// gather buffers.
  std::size_t buffer_bytes = 0;
};

namespace detail {

// Copies (or rounds) the floating leaves of `tree`, in tree order, into `flat`.
template <class Wire, class Tree>
void flatten_into(const Tree& tree, std::span<Wire> flat) {
  std::size_t offset = 0;
  for_each_leaf(
      [&]<class L>(const L& leaf) {
        if constexpr (floating_leaf<L>) {
          static_assert(std::is_same_v<leaf_scalar_t<L>, float>,
                        "xax::distributed::GradientReducer reduces fp32 gradients (TrainStep's update_type "
                        "float); double-precision params are not supported");
          const auto values = leaf_span(leaf);
          if (offset + values.size() > flat.size())
            throw ShapeError("xax::distributed::GradientReducer: the gradient tree grew between steps");
          convert(values, flat.subspan(offset, values.size()));
          offset += values.size();
        }
      },
      tree);
  if (offset != flat.size())
    throw ShapeError("xax::distributed::GradientReducer: the gradient tree shrank between steps");
}

// Adds the floating leaves of `tree`, in tree order, to `flat` element by element (the fast mode's local sum,
// without a flattened copy of the addend).
template <class Tree>
void add_into(const Tree& tree, std::span<float> flat) {
  std::size_t offset = 0;
  for_each_leaf(
      [&]<class L>(const L& leaf) {
        if constexpr (floating_leaf<L>) {
          const auto values = leaf_span(leaf);
          if (offset + values.size() > flat.size())
            throw ShapeError(
                "xax::distributed::GradientReducer: the gradient tree grew between micro-batches");
          float* const out = flat.data() + offset;
          for (std::size_t i = 0; i < values.size(); ++i) out[i] += values[i];
          offset += values.size();
        }
      },
      tree);
  if (offset != flat.size())
    throw ShapeError("xax::distributed::GradientReducer: the gradient tree shrank between micro-batches");
}

// Writes `values`, the flat elements [begin, begin + values.size()) of the gradient, into the floating
// leaves of `tree` in tree order (widened to float), and leaves every other element as it is.
template <class Wire, class Tree>
void write_range(std::span<const Wire> values, std::size_t begin, Tree& tree) {
  std::size_t offset = 0;
  const std::size_t end = begin + values.size();
  for_each_leaf(
      [&]<class L>(L& leaf) {
        if constexpr (floating_leaf<L>) {
          auto out = leaf_span(leaf);
          const std::size_t first = std::max(begin, offset);
          const std::size_t last = std::min(end, offset + out.size());
          if (first < last)
            convert(values.subspan(first - begin, last - first), out.subspan(first - offset, last - first));
          offset += out.size();
        }
      },
      tree);
}

// Sets every floating leaf of `tree` to zero.
template <class Tree>
void zero_floating_leaves(Tree& tree) {
  for_each_leaf(
      [&]<class L>(L& leaf) {
        if constexpr (floating_leaf<L>) {
          auto out = leaf_span(leaf);
          std::fill(out.begin(), out.end(), 0.0f);
        }
      },
      tree);
}

template <class T>
std::size_t capacity_bytes(const std::vector<T>& v) {
  return v.capacity() * sizeof(T);
}

}  // namespace detail

namespace detail {

// A digest of every leaf's shape and scalar type, in walk order. Counts alone let {4, 2} elements on one rank
// pass against {2, 4} on another, and then only the rank whose leaf is shorter failed its broadcast.
template <class Tree>
std::uint64_t tree_shape_digest(const Tree& tree) {
  std::uint64_t digest = 0;
  const auto add = [&digest](std::uint64_t value) { digest = xax::detail::mix64(digest ^ value); };
  for_each_leaf(
      [&]<class L>(const L& leaf) {
        using S = leaf_scalar_t<L>;
        if constexpr (floating_scalar<S>) {
          add(static_cast<std::uint64_t>(dtype_of<S>) + 1);
        } else {
          add(std::uint64_t{1} << 32 | sizeof(S));  // an integer or bool leaf, by its size
        }
        const auto shape = xax::detail::leaf_shape(leaf);
        add(shape.size());
        for (const Eigen::Index dimension : shape) add(static_cast<std::uint64_t>(dimension));
      },
      tree);
  return digest;
}

}  // namespace detail

/// Throws ShapeError on every rank unless every rank's tree has the same leaves: the same number, and each
/// of the same shape and scalar type (a cheap guard against ranks built with different models, which would
/// otherwise corrupt or hang the collectives).
template <class Tree>
void check_same_structure(const Communicator& comm, const Tree& tree, const char* what) {
  const std::int64_t mine[3] = {static_cast<std::int64_t>(leaf_count(tree)),
                                static_cast<std::int64_t>(floating_element_count(tree)),
                                static_cast<std::int64_t>(detail::tree_shape_digest(tree))};
  std::int64_t low[3] = {};
  std::int64_t high[3] = {};
  comm.all_reduce(mine, low, 3, MPI_MIN);
  comm.all_reduce(mine, high, 3, MPI_MAX);
  if (low[0] != high[0] || low[1] != high[1]) {
    throw ShapeError(std::string(what) + ": the ranks hold different trees (leaves from " +
                     std::to_string(low[0]) + " to " + std::to_string(high[0]) + ", elements from " +
                     std::to_string(low[1]) + " to " + std::to_string(high[1]) + " across " +
                     std::to_string(comm.size()) + " ranks); every rank must build the same model");
  }
  if (low[2] != high[2]) {
    throw ShapeError(std::string(what) + ": the ranks hold trees of " + std::to_string(low[0]) +
                     " leaves and " + std::to_string(low[1]) +
                     " elements whose leaves differ in shape or scalar type across " +
                     std::to_string(comm.size()) + " ranks; every rank must build the same model");
  }
}

/// Overwrites every floating leaf of `tree` with rank `root`'s values (every rank then starts from the same
/// parameters). Throws ShapeError on every rank when the ranks' trees differ in structure.
template <class Tree>
void broadcast_tree(const Communicator& comm, Tree& tree, int root = 0) {
  if (root < 0 || root >= comm.size()) {
    throw ConfigError("xax::distributed::broadcast_tree: root " + std::to_string(root) +
                      " is not a rank; expected 0 <= root < " + std::to_string(comm.size()));
  }
  check_same_structure(comm, tree, "xax::distributed::broadcast_tree");
  for_each_leaf(
      [&]<class L>(L& leaf) {
        if constexpr (floating_leaf<L>) {
          auto values = leaf_span(leaf);
          comm.broadcast(values.data(), values.size(), root);
        }
      },
      tree);
}

/// Sums one data-parallel step's gradients over every process (see the file comment). Meets TrainStep's
/// gradient_reducer protocol through `collect` and `reduce`: hand it each micro-batch's gradients and loss
/// as they are computed, then ask for the reduced sum. It owns its Communicator and keeps its buffers from
/// step to step (nothing is allocated after the first step).
class GradientReducer {
 public:
  explicit GradientReducer(Communicator comm, ReducerOptions options = {})
      : comm_(std::move(comm)), options_(options) {
    if (options_.wire != DType::float32 && options_.wire != DType::bfloat16) {
      throw ConfigError("xax::distributed::GradientReducer: wire type " +
                        std::string(dtype_name(options_.wire)) +
                        " is not accepted; expected float32 or bfloat16");
    }
  }

  [[nodiscard]] const Communicator& communicator() const { return comm_; }
  [[nodiscard]] const ReducerOptions& options() const { return options_; }
  [[nodiscard]] const ReductionStats& stats() const { return stats_; }

  /// Takes micro-batch `index`'s (scaled) gradients and its loss. Indices count from 0 within the step.
  template <class Grads>
  void collect(std::size_t index, double loss, const Grads& grads) {
    if (index == 0) local_losses_.clear();  // a new step (also after a step that threw)
    if (index != local_losses_.size()) {
      throw Error("xax::distributed::GradientReducer::collect: got micro-batch " + std::to_string(index) +
                  " after " + std::to_string(local_losses_.size()) +
                  "; give a step's micro-batches in order, from 0");
    }
    if (index == 0) shape(grads);
    local_losses_.push_back(loss);
    if (options_.deterministic) {
      // Every micro-batch is a contribution of its own, rounded to the wire type once here.
      if (contributions_ < index + 1) {
        contributions_ = index + 1;
        if (wire_is_bf16()) {
          send16_.resize(contributions_ * elements_);
        } else {
          send32_.resize(contributions_ * elements_);
        }
      }
      if (wire_is_bf16()) {
        detail::flatten_into(grads, std::span<bfloat16>(send16_).subspan(index * elements_, elements_));
      } else {
        detail::flatten_into(grads, std::span<float>(send32_).subspan(index * elements_, elements_));
      }
    } else {
      // Summed locally, left to right, as TrainStep's own accumulation does.
      if (index == 0) {
        detail::flatten_into(grads, std::span<float>(local_sum_));
      } else {
        detail::add_into(grads, std::span<float>(local_sum_));
      }
    }
  }

  /// Writes the sum of every collected micro-batch gradient over every rank into `grads` (the same bits on
  /// every rank) and returns the loss summed over the same micro-batches and their number. Collective: every
  /// rank calls it once per step, after collecting at least one micro-batch.
  template <class Grads>
  ReducedGradients reduce(Grads& grads) {
    return reduce_into(grads, {}, false);
  }

  /// The reduce-scatter of ZeRO-1: as reduce(), but rank q sums the flat elements [bounds[q], bounds[q + 1])
  /// (`bounds`: W + 1 non-decreasing offsets from 0 to the gradient's element count) and `grads` receives
  /// those sums, with zeros everywhere else; nothing is all-gathered. Each sum has the same bits reduce()
  /// gives it. Collective.
  template <class Grads>
  ReducedGradients reduce_scatter(Grads& grads, std::span<const std::size_t> bounds) {
    return reduce_into(grads, bounds, true);
  }

 private:
  template <class Grads>
  ReducedGradients reduce_into(Grads& grads, std::span<const std::size_t> bounds, bool scatter_only) {
    const auto start = std::chrono::steady_clock::now();
    const std::size_t local = local_losses_.size();
    if (local == 0) {
      throw Error("xax::distributed::GradientReducer::reduce: no micro-batch was collected on rank " +
                  std::to_string(comm_.rank()) + "; every rank needs at least one per step");
    }
    if (!structure_checked_) {
      check_same_structure(comm_, grads, "xax::distributed::GradientReducer");
      structure_checked_ = true;
    }
    const auto world = static_cast<std::size_t>(comm_.size());
    const auto me = static_cast<std::size_t>(comm_.rank());

    // How many micro-batches each rank has: the losses' layout, and in deterministic mode the contributions'.
    counts_.assign(world, 0);
    const auto local_count = static_cast<std::int64_t>(local);
    comm_.all_gather(&local_count, 1, counts_.data());
    int_counts_.resize(world);
    int_offsets_.resize(world);
    std::int64_t total = 0;
    for (std::size_t r = 0; r < world; ++r) {
      int_counts_[r] = Communicator::as_count(static_cast<std::size_t>(counts_[r]), "MPI_Allgatherv");
      int_offsets_[r] = Communicator::as_count(static_cast<std::size_t>(total), "MPI_Allgatherv");
      total += counts_[r];
    }
    if (options_.deterministic &&
        std::any_of(counts_.begin(), counts_.end(), [&](std::int64_t c) { return c != counts_[0]; })) {
      throw ConfigError(
          "xax::distributed::GradientReducer: deterministic reduction needs the same number of micro-batches "
          "on every rank, but rank " +
          std::to_string(me) + " sees counts from " +
          std::to_string(*std::min_element(counts_.begin(), counts_.end())) + " to " +
          std::to_string(*std::max_element(counts_.begin(), counts_.end())) +
          "; make the step's micro-batch count a multiple of the world size");
    }
    all_losses_.resize(static_cast<std::size_t>(total));
    comm_.all_gather_v(local_losses_.data(), static_cast<int>(local), all_losses_.data(), int_counts_.data(),
                       int_offsets_.data());
    double loss_sum = 0;
    for (const double loss : all_losses_) loss_sum += loss;  // micro-batch order, as TrainStep sums

    if (!bounds.empty() && (bounds.size() != world + 1 || bounds.front() != 0 || bounds.back() != elements_ ||
                            !std::is_sorted(bounds.begin(), bounds.end()))) {
      throw ShapeError("xax::distributed::GradientReducer::reduce_scatter: the shard bounds do not cut the " +
                       std::to_string(elements_) + " gradient elements into " + std::to_string(world) +
                       " contiguous ranges");
    }
    const std::size_t per_rank = options_.deterministic ? local : 1;  // contributions each rank sends
    // ZeRO-1 leaves zeros outside this rank's shard; the buckets below write the shard's sums.
    if (scatter_only) detail::zero_floating_leaves(grads);

    // The flat gradient is reduced in buckets of at most bucket_size elements, one after the other. Within
    // bucket [b0, b1), chunk q is summed by rank q. Each element's sum is the same additions in the same
    // order (contribution after contribution) whichever bucket and chunk it falls in, so the bucket size
    // changes no bit of the result.
    const std::size_t bucket =
        options_.bucket_size == 0 ? elements_ : std::min(options_.bucket_size, elements_);
    chunk_counts_.resize(world);
    chunk_offsets_.resize(world);
    std::size_t wire_elements = 0;  // elements this rank sends to other ranks in this step
    std::size_t buckets = 0;
    for (std::size_t b0 = 0; b0 < elements_; b0 += bucket) {
      const std::size_t b1 = std::min(b0 + bucket, elements_);
      const std::size_t length = b1 - b0;
      ++buckets;
      // Chunk q of this bucket, as offsets relative to b0: a proportional cut, or the bucket's part of rank
      // q's shard.
      for (std::size_t q = 0; q < world; ++q) {
        const std::size_t begin = bounds.empty() ? b0 + length * q / world : std::clamp(bounds[q], b0, b1);
        const std::size_t end =
            bounds.empty() ? b0 + length * (q + 1) / world : std::clamp(bounds[q + 1], b0, b1);
        chunk_offsets_[q] = Communicator::as_count(begin - b0, "MPI_Alltoallv");
        chunk_counts_[q] = Communicator::as_count(end - begin, "MPI_Alltoallv");
      }
      const auto mine = static_cast<std::size_t>(chunk_counts_[me]);
      const std::size_t mine_begin = b0 + static_cast<std::size_t>(chunk_offsets_[me]);
      wire_elements += per_rank * (length - mine) + (scatter_only ? 0 : mine * (world - 1));
      // This rank's sums of the bucket, in the wire type: written into its shard alone (ZeRO-1; for bf16,
      // the rounded bits the other ranks would get), or gathered from every rank into the whole bucket.
      const auto deliver = [&]<class Wire>(const std::vector<Wire>& sums, std::vector<Wire>& gathered) {
        if (scatter_only) {
          detail::write_range(std::span<const Wire>(sums), mine_begin, grads);
        } else {
          gathered.resize(length);
          comm_.all_gather_v(sums.data(), static_cast<int>(mine), gathered.data(), chunk_counts_.data(),
                             chunk_offsets_.data());
          detail::write_range(std::span<const Wire>(gathered), b0, grads);
        }
      };

      if (wire_is_bf16()) {
        const bfloat16* send = nullptr;
        std::size_t stride = 0;
        if (options_.deterministic) {
          send = send16_.data() + b0;
          stride = elements_;
        } else {
          // Only this bucket of the local sum is rounded to the wire type: the staging buffer is a bucket.
          send16_.resize(length);
          convert(std::span<const float>(local_sum_).subspan(b0, length), std::span<bfloat16>(send16_));
          send = send16_.data();
          stride = length;
        }
        exchange_and_sum<bfloat16>(send, stride, receive16_, per_rank, mine);
        sum16_.resize(mine);
        convert(std::span<const float>(sum_), std::span<bfloat16>(sum16_));  // rounded once
        deliver(sum16_, gathered16_);
      } else {
        const float* send = options_.deterministic ? send32_.data() + b0 : local_sum_.data() + b0;
        exchange_and_sum<float>(send, elements_, receive32_, per_rank, mine);
        deliver(sum_, gathered32_);
      }
    }

    // Bytes this rank put on the wire: its contributions to the other ranks' chunks, and its own chunks'
    // sums to every other rank.
    const std::size_t wire_size = wire_is_bf16() ? 2 : 4;
    stats_.wire_bytes_last = wire_elements * wire_size;
    stats_.wire_bytes_total += stats_.wire_bytes_last;
    stats_.elements = elements_;
    stats_.buckets_last = buckets;
    stats_.buffer_bytes = detail::capacity_bytes(local_sum_) + detail::capacity_bytes(send32_) +
                          detail::capacity_bytes(receive32_) + detail::capacity_bytes(sum_) +
                          detail::capacity_bytes(widened_) + detail::capacity_bytes(gathered32_) +
                          detail::capacity_bytes(send16_) + detail::capacity_bytes(receive16_) +
                          detail::capacity_bytes(sum16_) + detail::capacity_bytes(gathered16_);
    ++stats_.reductions;
    stats_.seconds += std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    local_losses_.clear();
    return {loss_sum, total};
  }

  [[nodiscard]] bool wire_is_bf16() const { return options_.wire == DType::bfloat16; }

  template <class Grads>
  void shape(const Grads& grads) {
    const std::size_t n = floating_element_count(grads);
    if (elements_ != n) {
      elements_ = n;
      contributions_ = 0;
      structure_checked_ = false;
      if (!options_.deterministic) {
        local_sum_.resize(n);
      }
    }
  }

  // Within the current bucket, sends chunk q of each of this rank's `per_rank` contributions to rank q
  // (contribution j starts at send + j * stride; chunk_offsets_ are relative to it), receives every rank's
  // contributions to this rank's chunk (`mine` elements) and adds them in fp32, rank by rank and within a
  // rank in micro-batch order, into sum_.
  template <class Wire>
  void exchange_and_sum(const Wire* send, std::size_t stride, std::vector<Wire>& receive,
                        std::size_t per_rank, std::size_t mine) {
    const auto world = static_cast<std::size_t>(comm_.size());
    receive.resize(world * per_rank * mine);
    receive_counts_.assign(world, static_cast<int>(mine));
    receive_offsets_.resize(world);
    for (std::size_t j = 0; j < per_rank; ++j) {
      for (std::size_t p = 0; p < world; ++p) {
        receive_offsets_[p] = Communicator::as_count((p * per_rank + j) * mine, "MPI_Alltoallv");
      }
      comm_.all_to_all_v(send + j * stride, chunk_counts_.data(), chunk_offsets_.data(), receive.data(),
                         receive_counts_.data(), receive_offsets_.data());
    }
    sum_.resize(mine);
    const std::size_t contributions = world * per_rank;
    if constexpr (std::is_same_v<Wire, float>) {
      std::copy_n(receive.data(), mine, sum_.data());
      for (std::size_t c = 1; c < contributions; ++c) {
        const float* addend = receive.data() + c * mine;
        for (std::size_t i = 0; i < mine; ++i) sum_[i] += addend[i];
      }
    } else {
      widened_.resize(mine);
      convert(std::span<const Wire>(receive.data(), mine), std::span<float>(sum_));
      for (std::size_t c = 1; c < contributions; ++c) {
        convert(std::span<const Wire>(receive.data() + c * mine, mine), std::span<float>(widened_));
        for (std::size_t i = 0; i < mine; ++i) sum_[i] += widened_[i];
      }
    }
  }

  Communicator comm_;
  ReducerOptions options_;
  ReductionStats stats_;
  std::size_t elements_ = 0;
  std::size_t contributions_ = 0;  // deterministic mode: contribution slots the send buffer holds
  bool structure_checked_ = false;
  std::vector<double> local_losses_, all_losses_;
  std::vector<std::int64_t> counts_;
  std::vector<int> int_counts_, int_offsets_, chunk_counts_, chunk_offsets_, receive_counts_,
      receive_offsets_;
  std::vector<float> local_sum_, send32_, receive32_, sum_, widened_, gathered32_;
  std::vector<bfloat16> send16_, receive16_, sum16_, gathered16_;
};

}  // namespace xax::distributed
