#pragma once
/// \file
/// ZeRO stage 1 (DESIGN §12): `xax::distributed::ZeroShardLayout`, which cuts the parameters into one shard
/// per rank, and `xax::distributed::ZeroOptimizer<Params>`, AdamW or SGD whose state (AdamW's m and v, SGD's
/// momentum) each rank holds for its shard only, and, when the compute type is narrower than the fp32
/// masters (the mixed policies), the masters too: per rank, fp32 masters + bf16 compute copy + AdamW go from
/// 4N + 2N + 8N bytes to 4N/W + 2N + 8N/W.
///
/// The shard rule: the floating leaves of the params, in tree order, form one flat vector of N elements. Each
/// leaf is cut into blocks of xax::detail::norm_block (1024) elements from its start (the last block of a
/// leaf may be shorter). Shard q of W is a contiguous run of whole blocks, [B_q, B_{q+1}): B_0 = 0, B_W = N,
/// and B_q is the block start nearest to N·q/W (the lower one on a tie). Shards are therefore equal up to one
/// block, a leaf may straddle any number of shards, and a shard boundary always falls on a block boundary,
/// which is what keeps every per-element and per-block computation (the optimizer's chunks, the gradient
/// norm's partial sums) the same as in the unsharded step.
///
/// Sharded masters (compute type narrower than the fp32 masters): TrainStep offers its masters to the
/// optimizer (adopt_masters, the optimizer door's hook in xax/task/any_optimizer.hpp), which keeps this
/// rank's shard, and TrainStep frees its whole copy; the full compute copy stays on every rank for the
/// forward. One step, per rank: the optimizer updates its fp32 shard from the (summed, unscaled) gradients
/// of its shard, with exactly the arithmetic of optim::AdamW / optim::Sgd on those elements, and writes each
/// updated element's cast (round to nearest, as the built-ins' fused copy) into the compute copy in the same
/// pass; then the compute copy is all-gathered leaf by leaf in place, in its own type (half the bytes of the
/// fp32 masters for bf16). Every rank ends the step with the same compute copy, and the union of the shards
/// is bit-for-bit the unsharded (stage 0) run's masters. TrainStep::params() then throws (no rank holds the
/// masters whole) and names the collective TrainStep::gather_params(), which MixedPrecisionMixin's
/// params_float32() calls; evaluation reads the compute copy.
///
/// Masters that are the compute params (the fp32 policy) stay whole on every rank: sharding them would be
/// ZeRO-3 (the forward would need them gathered). There, and for half-precision masters (the float16 preset,
/// updated in place by step_half_masters, without an fp32 copy), the optimizer updates the masters of its
/// shard in place and the updated masters are all-gathered leaf by leaf in place, in their own type
/// (MPI_Allgatherv with MPI_IN_PLACE), so every rank ends the step with the same, full masters: only the
/// optimizer state is sharded.
///
/// The gradients are reduce-scattered (DataParallelMixin under zero_stage 1): after the reduction a rank
/// holds the step's summed gradients on its shard and zeros elsewhere, and the finite flag and the norm are
/// combined over the shards (the same bits as unscale_check_and_norm over the whole). So every rank takes the
/// same skip decision, scale and counters; only StepResult::non_finite, the diagnostic naming the non-finite
/// tensors, names those of the rank's own shard.
///
/// Checkpoints: rank 0 writes the whole, unsharded optimizer state, in exactly the format optim::AdamW /
/// optim::Sgd write, and the whole masters (so a ZeRO-1 checkpoint resumes under stage 0 and on any world
/// size, and a stage-0 one resumes under ZeRO-1). Before rank 0 saves, every rank calls
/// DataParallelMixin::prepare_checkpoint() (TrainMixin::fit does), which gathers the shards of the state and
/// of the masters to rank 0. Loading reads the whole file on every rank and keeps the shard of this world
/// size: re-sharding is loading. The replica check after a load compares a digest of the whole masters each
/// rank read, taken before it kept its shard (DataParallelMixin::verify_loaded_state).
///
/// The optimizer plugs into TrainStep through the optimizer door (xax/task/any_optimizer.hpp) like any other,
/// usually made by DataParallelMixin::sharded_optimizer. Only the built-in AdamW and SGD (with their
/// parameter groups) can be sharded; a user optimizer through the door runs unsharded.

#include <mpi.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <tuple>
#include <type_traits>
#include <utility>
#include <variant>
#include <vector>
#include <xax/detail/convert.hpp>
#include <xax/detail/eigen.hpp>
#include <xax/detail/parallel.hpp>
#include <xax/detail/scratch.hpp>
#include <xax/distributed/communicator.hpp>
#include <xax/optim/adamw.hpp>
#include <xax/optim/sgd.hpp>
#include <xax/task/checkpoint.hpp>
#include <xax/task/train_step.hpp>
#include <xax/utils/error.hpp>
#include <xax/utils/finite.hpp>
#include <xax/utils/tree.hpp>
#include <xax/utils/tree_cast.hpp>
#include <xax/utils/tree_crc32.hpp>

namespace xax::distributed {

/// One piece of a shard: `count` elements of floating leaf `leaf` from element `begin` of the leaf, held at
/// `shard_offset` in the shard's flat arrays.
struct ZeroSegment {
  std::size_t leaf = 0;
  std::size_t begin = 0;
  std::size_t count = 0;
  std::size_t shard_offset = 0;
};

/// Which elements of the flat parameter vector each rank owns (see the file comment for the rule).
class ZeroShardLayout {
 public:
  ZeroShardLayout() = default;

  /// The layout for `world_size` shards of a parameter tree whose floating leaves have `leaf_sizes` elements.
  ZeroShardLayout(std::vector<std::size_t> leaf_sizes, int world_size) : leaf_sizes_(std::move(leaf_sizes)) {
    if (world_size < 1) {
      throw ConfigError("xax::distributed::ZeroShardLayout: world size " + std::to_string(world_size) +
                        " is not accepted; expected >= 1");
    }
    leaf_offsets_.assign(leaf_sizes_.size() + 1, 0);
    std::vector<std::size_t> block_starts;  // flat offsets of every block start, then N
    for (std::size_t l = 0; l < leaf_sizes_.size(); ++l) {
      for (std::size_t b = 0; b < leaf_sizes_[l]; b += xax::detail::norm_block)
        block_starts.push_back(leaf_offsets_[l] + b);
      leaf_offsets_[l + 1] = leaf_offsets_[l] + leaf_sizes_[l];
    }
    const std::size_t total = leaf_offsets_.back();
    block_starts.push_back(total);
    const auto world = static_cast<std::size_t>(world_size);
    bounds_.assign(world + 1, total);
    bounds_[0] = 0;
    for (std::size_t q = 1; q < world; ++q) {
      // floor(N·q/W) without overflowing N·q.
      const std::size_t target = total / world * q + total % world * q / world;
      const auto above = std::lower_bound(block_starts.begin(), block_starts.end(), target);
      std::size_t chosen = *above;
      if (above != block_starts.begin() && target - *(above - 1) <= *above - target) chosen = *(above - 1);
      bounds_[q] = std::max(chosen, bounds_[q - 1]);
    }
  }

  /// Shards (the world size the layout was made for).
  [[nodiscard]] int shards() const { return static_cast<int>(bounds_.size()) - 1; }
  /// Elements of the flat parameter vector (N).
  [[nodiscard]] std::size_t elements() const { return leaf_offsets_.back(); }
  /// Shard q is the flat range [shard_begin(q), shard_end(q)).
  [[nodiscard]] std::size_t shard_begin(int q) const { return bounds_[checked_shard(q)]; }
  [[nodiscard]] std::size_t shard_end(int q) const { return bounds_[checked_shard(q) + 1]; }
  [[nodiscard]] std::size_t shard_size(int q) const { return shard_end(q) - shard_begin(q); }
  [[nodiscard]] const std::vector<std::size_t>& leaf_sizes() const { return leaf_sizes_; }
  /// The flat offset of floating leaf l's first element.
  [[nodiscard]] std::size_t leaf_offset(std::size_t l) const { return leaf_offsets_.at(l); }

  /// Shard q's pieces, leaf by leaf, in flat order.
  [[nodiscard]] std::vector<ZeroSegment> segments(int q) const {
    static_cast<void>(checked_shard(q));
    std::vector<ZeroSegment> pieces;
    const std::size_t first = shard_begin(q);
    const std::size_t last = shard_end(q);
    for (std::size_t l = 0; l < leaf_sizes_.size(); ++l) {
      const std::size_t begin = std::max(first, leaf_offsets_[l]);
      const std::size_t end = std::min(last, leaf_offsets_[l + 1]);
      if (begin < end) pieces.push_back({l, begin - leaf_offsets_[l], end - begin, begin - first});
    }
    return pieces;
  }

 private:
  // `q` as an index of bounds_, or ConfigError when it names no shard.
  [[nodiscard]] std::size_t checked_shard(int q) const {
    if (q < 0 || q >= shards()) {
      throw ConfigError("xax::distributed::ZeroShardLayout: shard " + std::to_string(q) +
                        " is not accepted; this layout has shards 0 to " + std::to_string(shards() - 1));
    }
    return static_cast<std::size_t>(q);
  }

  std::vector<std::size_t> leaf_sizes_;
  std::vector<std::size_t> leaf_offsets_{0};
  std::vector<std::size_t> bounds_{0, 0};
};

/// A ZeroOptimizer's own state, for its shard only: the step count and AdamW's first and second moments (SGD:
/// `first` is the momentum buffer, empty without momentum; `second` is empty). Flat, in shard order.
struct ZeroShardState {
  std::int64_t step = 0;
  Eigen::VectorXf first;
  Eigen::VectorXf second;
  XAX_FIELDS(step, first, second);
};

namespace detail {

/// Where DataParallelMixin finds the optimizer of its train step (to take its shard layout and gather its
/// shards for a checkpoint). Every ZeroOptimizer made for the task enrolls here when it is made, moved, steps
/// or loads a state, and leaves when destroyed; the last enrolled is the live one. A list rather than one
/// pointer, so that when TrainStep's load fails after the optimizer's copy loaded its state, destroying that
/// copy leaves the previous optimizer live.
struct ZeroRegistry {
  struct Entry {
    const void* optimizer = nullptr;
    std::function<void()> gather;
    const ZeroShardLayout* layout = nullptr;
    // Bytes sent in the last step's all-gather of the masters (or of the compute copy, when owned).
    std::function<std::size_t()> master_gather_bytes;
    // When the optimizer owns the masters: the digest of the whole masters it adopted; otherwise empty.
    std::function<std::optional<std::uint64_t>()> owned_masters_digest;
  };
  std::vector<Entry> enrolled;

  /// The live optimizer's entry, or null.
  [[nodiscard]] const Entry* live() const { return enrolled.empty() ? nullptr : &enrolled.back(); }
  [[nodiscard]] bool holds(const void* optimizer) const {
    return std::any_of(enrolled.begin(), enrolled.end(),
                       [&](const Entry& e) { return e.optimizer == optimizer; });
  }
  void enroll(Entry entry) {
    leave(entry.optimizer);
    enrolled.push_back(std::move(entry));
  }
  void leave(const void* optimizer) {
    std::erase_if(enrolled, [&](const Entry& e) { return e.optimizer == optimizer; });
  }
};

inline std::vector<std::size_t> floating_leaf_sizes(const auto& tree) {
  std::vector<std::size_t> sizes;
  for_each_leaf(
      [&sizes]<class L>(const L& leaf) {
        if constexpr (floating_leaf<L>) sizes.push_back(leaf_span(leaf).size());
      },
      tree);
  return sizes;
}

template <class Tree>
std::vector<float*> floating_leaf_pointers(Tree& tree) {
  std::vector<float*> pointers;
  for_each_leaf(
      [&pointers]<class L>(L& leaf) {
        if constexpr (floating_leaf<L>) {
          static_assert(
              std::is_same_v<leaf_scalar_t<L>, float>,
              "xax::distributed::ZeroOptimizer updates fp32 params (TrainStep's update_type float)");
          pointers.push_back(leaf_span(leaf).data());
        }
      },
      tree);
  return pointers;
}

// A digest of the floating leaves' bytes of `tree`, to compare whole trees across ranks: zlib's CRC-32
// (xax::tree_crc32) when xax has zlib, else std::hash of each leaf's bytes, combined in tree order.
template <class Tree>
std::uint64_t masters_digest(const Tree& tree) {
  if constexpr (has_tree_crc32) {
    return tree_crc32(tree);
  } else {
    std::uint64_t digest = 0;
    for_each_leaf(
        [&digest]<class L>(const L& leaf) {
          if constexpr (floating_leaf<L>) {
            const auto values = leaf_span(leaf);
            const std::string_view bytes(reinterpret_cast<const char*>(values.data()),
                                         values.size() * sizeof(values[0]));
            digest = digest * 1099511628211ULL + std::hash<std::string_view>{}(bytes);
          }
        },
        tree);
    return digest;
  }
}

template <class Tree>
std::vector<const float*> floating_leaf_pointers(const Tree& tree) {
  std::vector<const float*> pointers;
  for_each_leaf(
      [&pointers]<class L>(const L& leaf) {
        if constexpr (floating_leaf<L>) pointers.push_back(leaf_span(leaf).data());
      },
      tree);
  return pointers;
}

}  // namespace detail

/// AdamW or SGD over the masters `Params` (fp32 leaves) whose state each rank holds for its shard only (ZeRO
/// stage 1; see the file comment). Meets xax::train_optimizer: hand it to TrainStep::reset_train_state, or
/// return it from a task's make_optimizer. Unsharded (one rank, or `sharded` false), it is AdamW/SGD with
/// the same bits and the same checkpoints.
template <class Params>
class ZeroOptimizer {
 public:
  using params_type = Params;
  using State = ZeroShardState;
  using Options = std::variant<optim::AdamWOptions, optim::SgdOptions>;

  /// `like`: the params' shapes. `comm`: the data-parallel communicator (borrowed; it must outlive this
  /// optimizer), used when `sharded`. `registry`: where DataParallelMixin finds this optimizer (may be null).
  /// Throws ConfigError for a bad option, or when sharded without a communicator.
  ZeroOptimizer(const Params& like, Options options, MPI_Comm comm, bool sharded,
                std::shared_ptr<detail::ZeroRegistry> registry = nullptr)
      : options_(std::move(options)), comm_(comm), sharded_(sharded), registry_(std::move(registry)) {
    if (sharded_ && (comm_ == MPI_COMM_NULL || !mpi_running())) {
      throw ConfigError(
          "xax::distributed::ZeroOptimizer: zero_stage 1 shards the optimizer state over the ranks of a "
          "communicator, but none was given (MPI_COMM_NULL, or MPI is not running); give the data-parallel "
          "communicator, or use zero_stage 0");
    }
    int world = 1;
    if (sharded_) {
      check_mpi(MPI_Comm_rank(comm_, &rank_), "MPI_Comm_rank");
      check_mpi(MPI_Comm_size(comm_, &world), "MPI_Comm_size");
    }
    // The built-in optimizers validate the options (an empty tree costs nothing) and resolve the groups.
    std::visit(
        [&]<class O>(const O& chosen) {
          O without_groups = chosen;
          without_groups.groups = {};
          if constexpr (std::is_same_v<O, optim::AdamWOptions>) {
            static_cast<void>(optim::AdamW<Eigen::VectorXf>(Eigen::VectorXf(), without_groups));
          } else {
            static_cast<void>(optim::Sgd<Eigen::VectorXf>(Eigen::VectorXf(), without_groups));
          }
          settings_ = chosen.groups.resolve(like, chosen.weight_decay);
        },
        options_);
    layout_ = ZeroShardLayout(detail::floating_leaf_sizes(like), world);
    segments_ = layout_.segments(rank_);
    const auto mine = static_cast<Eigen::Index>(layout_.shard_size(rank_));
    if (is_adamw()) {
      state_.first = Eigen::VectorXf::Zero(mine);
      state_.second = Eigen::VectorXf::Zero(mine);
    } else if (has_momentum()) {
      state_.first = Eigen::VectorXf::Zero(mine);
    }
    // Per leaf, what each rank contributes to its all-gather.
    const std::size_t leaves = layout_.leaf_sizes().size();
    gather_counts_.assign(leaves * static_cast<std::size_t>(world), 0);
    gather_offsets_.assign(leaves * static_cast<std::size_t>(world), 0);
    for (int q = 0; q < world; ++q) {
      for (const ZeroSegment& piece : layout_.segments(q)) {
        const std::size_t at = piece.leaf * static_cast<std::size_t>(world) + static_cast<std::size_t>(q);
        gather_counts_[at] = Communicator::as_count(piece.count, "MPI_Allgatherv");
        gather_offsets_[at] = Communicator::as_count(piece.begin, "MPI_Allgatherv");
      }
    }
    enroll();
  }

  ZeroOptimizer(const ZeroOptimizer& other) : ZeroOptimizer(other, Copied{}) {}  // not the registered one
  ZeroOptimizer(ZeroOptimizer&& other) : ZeroOptimizer(other, Copied{}) {
    if (other.registered()) {  // the registration moves along, in its place in the list
      for (auto& entry : registry_->enrolled) {
        if (entry.optimizer == &other) entry = entry_for_this();
      }
    }
  }
  ZeroOptimizer& operator=(const ZeroOptimizer&) = delete;
  ZeroOptimizer& operator=(ZeroOptimizer&&) = delete;
  ~ZeroOptimizer() {
    if (registry_ != nullptr) registry_->leave(this);
  }

  /// One update: this rank's shard of `params` from the same shard of `grads` (which must hold the step's
  /// summed, unscaled gradients at least there), then, sharded, the all-gather of the updated masters. Throws
  /// Error once this optimizer owns the masters (adopt_masters): TrainStep then calls step_owned_masters.
  void step(Params& params, const Params& grads) {
    if (owns_masters_) {
      throw Error(
          "xax::distributed::ZeroOptimizer::step(params, grads): this optimizer owns the masters (sharded), "
          "so it updates its own shard: call step_owned_masters(grads, compute_copy)");
    }
    enroll();
    release_gathered();
    const std::vector<float*> param = detail::floating_leaf_pointers(params);
    const std::vector<const float*> grad = gradient_pointers(grads, param.size());
    const std::int64_t step = state_.step + 1;
    for (const ZeroSegment& piece : segments_) {
      update_piece(piece, param[piece.leaf] + piece.begin, grad[piece.leaf] + piece.begin, step,
                   static_cast<float*>(nullptr));
    }
    state_.step = step;
    half_gather_bytes_.reset();
    if (sharded_) all_gather_masters(param);
  }

  /// Takes this rank's shard of the whole masters `whole` and owns it from now on (ZeRO-1 with sharded
  /// masters; TrainStep offers the masters after every reset and load, when its compute copy is a tree of
  /// its own, and frees its own copy when this returns true). Unsharded, it declines (false). Also records a
  /// digest of `whole`, which DataParallelMixin::verify_loaded_state compares across ranks after a load.
  bool adopt_masters(const Params& whole) {
    if (!sharded_) return false;
    const std::vector<const float*> leaves = detail::floating_leaf_pointers(whole);
    if (leaves.size() != layout_.leaf_sizes().size()) {
      throw ShapeError("xax::distributed::ZeroOptimizer::adopt_masters: the masters have " +
                       std::to_string(leaves.size()) + " floating leaves; the optimizer was built for " +
                       std::to_string(layout_.leaf_sizes().size()));
    }
    Eigen::VectorXf shard(static_cast<Eigen::Index>(layout_.shard_size(rank_)));
    for (const ZeroSegment& piece : segments_)
      std::copy_n(leaves[piece.leaf] + piece.begin, piece.count, shard.data() + piece.shard_offset);
    masters_ = std::move(shard);
    adopted_digest_ = detail::masters_digest(whole);
    owns_masters_ = true;
    release_gathered();
    enroll();
    return true;
  }

  /// One update of the owned master shard from the same shard of `grads` that also writes its rounded
  /// (to nearest) cast into `copy`, the compute copy, in the same pass; then the compute copy is all-gathered
  /// leaf by leaf in its own type, so every rank ends the step with the whole compute copy. Each compute
  /// element is the cast of its master element, exactly as the unsharded fused step writes it.
  template <class Copy>
  void step_owned_masters(const Params& grads, Copy& copy) {
    if (!owns_masters_) {
      throw Error(
          "xax::distributed::ZeroOptimizer::step_owned_masters: this optimizer does not own the masters "
          "(adopt_masters was not called, or it declined: unsharded); call step(params, grads)");
    }
    enroll();
    release_gathered();
    const std::size_t leaves = layout_.leaf_sizes().size();
    const std::vector<const float*> grad = gradient_pointers(grads, leaves);
    const std::int64_t step = state_.step + 1;
    int world = 1;
    check_mpi(MPI_Comm_size(comm_, &world), "MPI_Comm_size");
    const auto w = static_cast<std::size_t>(world);
    std::size_t leaf = 0;
    std::size_t next = 0;  // segments_ are in leaf order
    std::size_t sent = 0;
    for_each_leaf(
        [&]<class C>(C& copy_leaf) {
          if constexpr (floating_leaf<C>) {
            using Scalar = leaf_scalar_t<C>;
            const auto target = leaf_span(copy_leaf);
            if (leaf >= leaves || target.size() != layout_.leaf_sizes()[leaf]) {
              throw ShapeError(
                  "xax::distributed::ZeroOptimizer::step_owned_masters: the compute copy does not have the "
                  "masters' shapes (floating leaf " +
                  std::to_string(leaf) + ")");
            }
            for (; next < segments_.size() && segments_[next].leaf == leaf; ++next) {
              const ZeroSegment& piece = segments_[next];
              update_piece(piece, masters_.data() + piece.shard_offset, grad[leaf] + piece.begin, step,
                           target.data() + piece.begin);
              sent += piece.count * sizeof(Scalar) * (w - 1);
            }
            if (target.size() > 0) all_gather_leaf(target.data(), leaf, w);
            ++leaf;
          }
        },
        copy);
    state_.step = step;
    owned_gather_bytes_ = sent;
  }

  /// One update of half-precision masters (the float16 preset; bfloat16 and float16 leaves, and float leaves
  /// a policy keeps in full precision) in place, without an fp32 copy of them, as optim::AdamW /
  /// optim::Sgd::step_half_masters do: this rank's shard of each half leaf is widened chunk by chunk, updated
  /// with the fp32 state of the shard and rounded back with `update.rounding` (the same random stream per
  /// leaf and element, so the same bits as unsharded); then, sharded, every leaf is all-gathered in place in
  /// its own type (half the bytes of the fp32 copy's gather), and under Kahan rounding the compensation tree
  /// too, so that every rank ends the step with the same masters and compensation. ShapeError when the trees
  /// differ, ConfigError for Kahan without a compensation tree, Error once this optimizer owns fp32 masters.
  template <tree Masters>
  void step_half_masters(
      Masters& masters, const Params& grads, const optim::HalfMasterUpdate& update,
      std::type_identity_t<Masters>*
          compensation) requires(optim::detail::half_master_tree<Masters>&&
                                     std::is_same_v<rebind_scalar_t<Masters, float>, Params>) {
    if (owns_masters_) {
      throw Error(
          "xax::distributed::ZeroOptimizer::step_half_masters: this optimizer owns fp32 masters (sharded); "
          "call step_owned_masters(grads, compute_copy)");
    }
    optim::detail::with_compensation(compensation, update, "ZeroOptimizer", [&](auto& carried) {
      step_half_leaves(masters, grads, update, carried);
    });
  }

  /// Collective when the optimizer owns the masters: writes the whole masters into `whole` (shaped like the
  /// params) on every rank, by an all-gather of the shards. Error if it does not own them.
  void gather_masters(Params& whole) const {
    if (!owns_masters_) {
      throw Error("xax::distributed::ZeroOptimizer::gather_masters: this optimizer does not own the masters");
    }
    const std::vector<float*> leaves = detail::floating_leaf_pointers(whole);
    int world = 1;
    check_mpi(MPI_Comm_size(comm_, &world), "MPI_Comm_size");
    const auto w = static_cast<std::size_t>(world);
    for (std::size_t l = 0; l < leaves.size(); ++l) {
      if (layout_.leaf_sizes()[l] == 0) continue;
      const float* send = masters_.data();
      int count = 0;
      for (const ZeroSegment& piece : segments_) {
        if (piece.leaf == l) {
          send = masters_.data() + piece.shard_offset;
          count = Communicator::as_count(piece.count, "MPI_Allgatherv");
        }
      }
      check_mpi(MPI_Allgatherv(send, count, MPI_FLOAT, leaves[l], gather_counts_.data() + l * w,
                               gather_offsets_.data() + l * w, MPI_FLOAT, comm_),
                "MPI_Allgatherv");
    }
  }

  /// Writes the whole masters under `entry` as a tree shaped like `like` (the format TrainStep writes its
  /// own masters in). Only rank 0 can, after gather_for_checkpoint() at this step (CheckpointError
  /// otherwise).
  void save_masters(CheckpointWriter& writer, const std::string& entry, const Params& like) const {
    if (!owns_masters_) {
      throw Error("xax::distributed::ZeroOptimizer::save_masters: this optimizer does not own the masters");
    }
    require_gathered();
    Params whole = like;
    scatter_into(gathered_masters_, whole);
    writer.add_tree(entry, whole);
  }

  /// Bytes of the master shard this optimizer owns (0 when it does not own the masters).
  [[nodiscard]] std::size_t master_bytes() const {
    return owns_masters_ ? static_cast<std::size_t>(masters_.size()) * sizeof(float) : 0;
  }
  [[nodiscard]] bool owns_masters() const { return owns_masters_; }
  /// Bytes this rank sent in the masters' all-gather of the last step: its shard of the fp32 masters, or,
  /// when it owns the masters, its shard of the compute copy in the compute type, or, after
  /// step_half_masters, its shard of the half masters (and of the Kahan compensation), to each other rank.
  [[nodiscard]] std::size_t master_gather_bytes_per_step() const {
    if (!sharded_) return 0;
    if (owns_masters_) return owned_gather_bytes_;
    if (half_gather_bytes_) return *half_gather_bytes_;
    return layout_.shard_size(rank_) * static_cast<std::size_t>(layout_.shards() - 1) * sizeof(float);
  }
  /// The digest of the whole masters adopt_masters was last given (see DataParallelMixin::
  /// verify_loaded_state).
  [[nodiscard]] std::uint64_t adopted_masters_digest() const { return adopted_digest_; }

  /// "adamw" or "sgd": the name the unsharded optimizer records, so that checkpoints are interchangeable.
  [[nodiscard]] std::string name() const { return is_adamw() ? "adamw" : "sgd"; }
  [[nodiscard]] double learning_rate() const {
    return std::visit([](const auto& o) { return o.learning_rate; }, options_);
  }
  /// Throws ConfigError for a negative or non-finite rate.
  void set_learning_rate(double learning_rate) {
    if (!std::isfinite(learning_rate) || learning_rate < 0) {
      throw ConfigError("xax::distributed::ZeroOptimizer: learning_rate " + std::to_string(learning_rate) +
                        " is not accepted; expected a finite value >= 0");
    }
    std::visit([&](auto& o) { o.learning_rate = learning_rate; }, options_);
  }
  /// This rank's shard of the optimizer state (what state_bytes() of a train step counts).
  [[nodiscard]] const State& state() const { return state_; }
  [[nodiscard]] State& state() { return state_; }
  [[nodiscard]] const ZeroShardLayout& layout() const { return layout_; }
  [[nodiscard]] bool sharded() const { return sharded_; }
  [[nodiscard]] int rank() const { return rank_; }

  /// Collective over the communicator: gathers every rank's shard of the state to rank 0, which keeps it
  /// until its next step, for save_state. Unsharded, there is nothing to gather.
  void gather_for_checkpoint() {
    if (!sharded_) return;
    int world = 1;
    check_mpi(MPI_Comm_size(comm_, &world), "MPI_Comm_size");
    std::vector<int> counts(static_cast<std::size_t>(world)), offsets(static_cast<std::size_t>(world));
    for (int q = 0; q < world; ++q) {
      counts[static_cast<std::size_t>(q)] = Communicator::as_count(layout_.shard_size(q), "MPI_Gatherv");
      offsets[static_cast<std::size_t>(q)] = Communicator::as_count(layout_.shard_begin(q), "MPI_Gatherv");
    }
    // Whether a buffer exists depends on the options alone, so every rank takes part in the same gathers.
    const auto gather = [&](bool exists, const Eigen::VectorXf& mine, std::vector<float>& whole) {
      if (!exists) return;
      if (rank_ == 0) whole.resize(layout_.elements());
      check_mpi(MPI_Gatherv(mine.data(), static_cast<int>(mine.size()), MPI_FLOAT, whole.data(),
                            counts.data(), offsets.data(), MPI_FLOAT, 0, comm_),
                "MPI_Gatherv");
    };
    gather(is_adamw() || has_momentum(), state_.first, gathered_first_);
    gather(is_adamw(), state_.second, gathered_second_);
    gather(owns_masters_, masters_, gathered_masters_);  // the same on every rank
    gathered_step_ = state_.step;
  }

  /// Writes the whole state under `entry` in optim::AdamW's or optim::Sgd's own format (`like`: the params'
  /// shapes). Sharded, only rank 0 can, after gather_for_checkpoint() at this step (CheckpointError
  /// otherwise).
  void save_state(CheckpointWriter& writer, const std::string& entry, const Params& like) const {
    const std::vector<float>* first = nullptr;
    const std::vector<float>* second = nullptr;
    std::vector<float> own_first, own_second;
    if (sharded_) {
      require_gathered();
      first = &gathered_first_;
      second = &gathered_second_;
    } else {
      own_first.assign(state_.first.data(), state_.first.data() + state_.first.size());
      own_second.assign(state_.second.data(), state_.second.data() + state_.second.size());
      first = &own_first;
      second = &own_second;
    }
    if (is_adamw()) {
      optim::AdamWState<Params> whole{state_.step, zeros_like(like), zeros_like(like)};
      scatter_into(*first, whole.m);
      scatter_into(*second, whole.v);
      writer.add_tree(entry, whole);
    } else {
      optim::SgdState<Params> whole;
      whole.step = state_.step;
      if (has_momentum()) {
        whole.momentum_buffer = zeros_like(like);
        scatter_into(*first, whole.momentum_buffer);
      }
      writer.add_tree(entry, whole);
    }
  }

  /// Reads the whole state save_state (or optim::AdamW / optim::Sgd) wrote under `entry` and keeps this
  /// rank's shard. CheckpointError, with this optimizer unchanged, when the entry does not fit.
  void load_state(const CheckpointReader& reader, const std::string& entry, const Params& like) {
    State loaded;
    const auto take = [&](const Params& whole, Eigen::VectorXf& shard) {
      const std::vector<const float*> leaves = detail::floating_leaf_pointers(whole);
      shard.resize(static_cast<Eigen::Index>(layout_.shard_size(rank_)));
      for (const ZeroSegment& piece : segments_)
        std::copy_n(leaves[piece.leaf] + piece.begin, piece.count, shard.data() + piece.shard_offset);
    };
    if (is_adamw()) {
      optim::AdamWState<Params> whole{0, zeros_like(like), zeros_like(like)};
      reader.read_tree(entry, whole);
      optim::detail::require_reachable_moments(whole.m, entry + ".m", false);
      optim::detail::require_reachable_moments(whole.v, entry + ".v", true);
      loaded.step = whole.step;
      take(whole.m, loaded.first);
      take(whole.v, loaded.second);
    } else {
      optim::SgdState<Params> whole;
      if (has_momentum()) whole.momentum_buffer = zeros_like(like);
      reader.read_tree(entry, whole);
      optim::detail::require_reachable_moments(whole.momentum_buffer, entry + ".momentum_buffer", false);
      loaded.step = whole.step;
      if (has_momentum()) take(whole.momentum_buffer, loaded.first);
    }
    xax::detail::require_countable_step(loaded.step, entry + ".step");
    state_ = std::move(loaded);
    release_gathered();
    enroll();
  }

 private:
  struct Copied {};
  ZeroOptimizer(const ZeroOptimizer& other, Copied)
      : options_(other.options_),
        settings_(other.settings_),
        comm_(other.comm_),
        sharded_(other.sharded_),
        rank_(other.rank_),
        registry_(other.registry_),
        layout_(other.layout_),
        segments_(other.segments_),
        gather_counts_(other.gather_counts_),
        gather_offsets_(other.gather_offsets_),
        state_(other.state_),
        gathered_first_(other.gathered_first_),
        gathered_second_(other.gathered_second_),
        gathered_step_(other.gathered_step_),
        masters_(other.masters_),
        owns_masters_(other.owns_masters_),
        adopted_digest_(other.adopted_digest_),
        owned_gather_bytes_(other.owned_gather_bytes_),
        half_gather_bytes_(other.half_gather_bytes_),
        gathered_masters_(other.gathered_masters_) {}

  [[nodiscard]] bool is_adamw() const { return std::holds_alternative<optim::AdamWOptions>(options_); }
  [[nodiscard]] bool has_momentum() const {
    return !is_adamw() && std::get<optim::SgdOptions>(options_).momentum != 0;
  }
  [[nodiscard]] bool registered() const { return registry_ != nullptr && registry_->holds(this); }

  void require_gathered() const {
    if (rank_ != 0 || gathered_step_ != state_.step) {
      throw CheckpointError(
          "xax::distributed::ZeroOptimizer: a ZeRO-1 checkpoint holds every rank's shard of the optimizer "
          "state (and of the masters, when sharded); call prepare_checkpoint() of the data-parallel task on "
          "every rank after the last step, then save on rank 0 only (TrainMixin::fit does both)" +
          std::string(rank_ != 0 ? "; this is rank " + std::to_string(rank_) : ""));
    }
  }

  std::vector<const float*> gradient_pointers(const Params& grads, std::size_t expected) const {
    std::vector<const float*> grad = detail::floating_leaf_pointers(grads);
    if (expected != layout_.leaf_sizes().size() || grad.size() != expected) {
      throw ShapeError("xax::distributed::ZeroOptimizer: the params have " + std::to_string(expected) +
                       " floating leaves and the gradients " + std::to_string(grad.size()) +
                       "; the optimizer was built for " + std::to_string(layout_.leaf_sizes().size()));
    }
    return grad;
  }

  // Updates the `piece.count` masters at `p` (in place) from the gradients at `g`, with exactly the
  // arithmetic of optim::AdamW / optim::Sgd on those elements, and writes their cast to `copy` (rounded to
  // nearest, as the built-ins' fused copy) when it is not null, chunk by chunk while the chunk is in cache.
  template <class Target>
  void update_piece(const ZeroSegment& piece, float* p, const float* g, std::int64_t step, Target* copy) {
    const std::size_t copy_bytes = copy != nullptr ? sizeof(Target) : 0;
    for_each_piece_chunk(piece, step, copy_bytes,
                         [p, g, copy](std::size_t i, std::size_t n, const auto& arithmetic) noexcept {
                           arithmetic(p + i, g + i, p + i, i, n);
                           if (copy != nullptr)
                             xax::detail::convert_serial(p + i, copy + i, n);  // still in L1
                         });
  }

  // Calls `chunk(i, n, arithmetic)` for consecutive chunks [i, i + n) of at most update_chunk elements of
  // `piece`, split across xax's threads as optim's driver splits a leaf (each element's arithmetic does not
  // depend on where a chunk starts). `arithmetic(in, grad, out, i, n)` is optim::AdamW's / optim::Sgd's
  // update of those n elements with this shard's state at piece offset i: `in` the old values, `out` the new.
  template <class Chunk>
  void for_each_piece_chunk(const ZeroSegment& piece, std::int64_t step, std::size_t extra_bytes,
                            const Chunk& chunk) {
    float* const first = state_.first.size() > 0 ? state_.first.data() : nullptr;
    float* const second = state_.second.size() > 0 ? state_.second.data() : nullptr;
    const optim::LeafSettings& leaf = settings_[piece.leaf];
    const auto chunks = [&piece, extra_bytes, &chunk](std::size_t bytes_per_element, const auto& arithmetic) {
      xax::detail::parallel_blocks(piece.count, bytes_per_element + extra_bytes, 16,
                                   [&chunk, &arithmetic](std::size_t begin, std::size_t end) noexcept {
                                     for (std::size_t i = begin; i < end; i += optim::detail::update_chunk)
                                       chunk(i, std::min(optim::detail::update_chunk, end - i), arithmetic);
                                   });
    };
    if (const auto* adamw = std::get_if<optim::AdamWOptions>(&options_)) {
      const auto constants = optim::detail::AdamWConstants<float>::make(*adamw, step, leaf);
      float* const m = first + piece.shard_offset;
      float* const v = second + piece.shard_offset;
      chunks(7 * sizeof(float), [&constants, m, v](const float* in, const float* grad, float* out,
                                                   std::size_t i, std::size_t n) noexcept {
        update_on_aligned_storage(
            out, n, std::array{m + i, v + i},
            [&](float* m_i, float* v_i, float* out_i) { constants.update(in, grad, m_i, v_i, out_i, n); });
      });
    } else {
      const auto& sgd = std::get<optim::SgdOptions>(options_);
      const optim::detail::SgdConstants<float> constants{
          static_cast<float>(sgd.learning_rate * leaf.learning_rate_scale), static_cast<float>(sgd.momentum),
          static_cast<float>(leaf.weight_decay), sgd.nesterov, step == 1};
      float* const buffer = first != nullptr ? first + piece.shard_offset : nullptr;
      chunks(4 * sizeof(float), [&constants, buffer](const float* in, const float* grad, float* out,
                                                     std::size_t i, std::size_t n) noexcept {
        update_on_aligned_storage(
            out, n, std::array{buffer != nullptr ? buffer + i : nullptr},
            [&](float* buffer_i, float* out_i) { constants.update(in, grad, buffer_i, out_i, n); });
      });
    }
  }

  // Runs `update(state[0] ..., out)` over n elements, where `out` is a chunk of a piece and `state` its
  // optimizer state at the same offset (a null state array stays null). Eigen runs the elements before the
  // first aligned destination, like the last ones, as scalars, and its scalar square root (exact) can differ
  // in the last bit from the vector one (EIGEN_FAST_MATH). A piece sits at any offset of the shard's flat
  // arrays, while optim's update runs on leaves that start aligned: where `out` is not aligned, the update
  // runs on aligned copies, so that every element takes the path the same element of the whole leaf takes,
  // and the update is bit for bit the unsharded one.
  template <std::size_t States, class Update>
  static void update_on_aligned_storage(float* out, std::size_t n, const std::array<float*, States>& state,
                                        const Update& update) noexcept {
    constexpr std::uintptr_t packet_alignment = EIGEN_MAX_ALIGN_BYTES > 0 ? EIGEN_MAX_ALIGN_BYTES : 1;
    if (reinterpret_cast<std::uintptr_t>(out) % packet_alignment == 0) {
      // Then the state is aligned too: the same offset in arrays alike.
      std::apply([&](auto*... state_i) { update(state_i..., out); }, state);
      return;
    }
    constexpr std::size_t chunk = optim::detail::update_chunk;
    thread_local xax::detail::ScratchBuffer<float> scratch;
    float* const copies = scratch.get((States + 1) * chunk);
    std::array<float*, States> state_copies{};
    for (std::size_t k = 0; k < States; ++k) {
      if (state[k] == nullptr) continue;
      state_copies[k] = copies + k * chunk;
      std::copy_n(state[k], n, state_copies[k]);
    }
    float* const out_copy = copies + States * chunk;
    std::apply([&](auto*... state_i) { update(state_i..., out_copy); }, state_copies);
    for (std::size_t k = 0; k < States; ++k) {
      if (state[k] != nullptr) std::copy_n(state_copies[k], n, state[k]);
    }
    std::copy_n(out_copy, n, out);
  }

  // step_half_masters after the compensation check: `compensation` is a tree shaped like the masters, or
  // optim::detail::NoTree.
  template <class Masters, class Compensation>
  void step_half_leaves(Masters& masters, const Params& grads, const optim::HalfMasterUpdate& update,
                        Compensation& compensation) {
    constexpr bool kahan = !std::is_same_v<std::remove_const_t<Compensation>, optim::detail::NoTree>;
    // Walking the trees together checks them before anything is written.
    if constexpr (kahan) {
      for_each_leaf([](const auto&...) {}, masters, grads, compensation);
    } else {
      for_each_leaf([](const auto&...) {}, masters, grads);
    }
    enroll();
    release_gathered();
    const std::size_t leaves = layout_.leaf_sizes().size();
    const std::vector<const float*> grad = gradient_pointers(grads, leaves);
    const std::int64_t step = state_.step + 1;
    int world = 1;
    if (sharded_) check_mpi(MPI_Comm_size(comm_, &world), "MPI_Comm_size");
    const auto w = static_cast<std::size_t>(world);
    std::size_t leaf = 0;
    std::size_t next = 0;  // segments_ are in leaf order
    std::size_t sent = 0;
    const auto update_leaf = [&]<class M>(M& master_leaf, M* compensation_leaf) {
      if constexpr (floating_leaf<M>) {
        using H = leaf_scalar_t<M>;
        const auto values = leaf_span(master_leaf);
        // A float leaf is updated in place, exactly: it has no rounding error to carry.
        H* carried = nullptr;
        if constexpr (!std::is_same_v<H, float>) {
          if (compensation_leaf != nullptr) carried = leaf_span(*compensation_leaf).data();
        }
        const optim::detail::HalfStore<H> store{update.rounding,
                                                optim::detail::rounding_key(update.seed, update.step, leaf)};
        for (; next < segments_.size() && segments_[next].leaf == leaf; ++next) {
          const ZeroSegment& piece = segments_[next];
          H* const p = values.data() + piece.begin;
          const float* const g = grad[leaf] + piece.begin;
          if constexpr (std::is_same_v<H, float>) {
            update_piece(piece, p, g, step, static_cast<float*>(nullptr));
          } else {
            H* const c = carried != nullptr ? carried + piece.begin : nullptr;
            for_each_piece_chunk(
                piece, step, sizeof(H),
                [p, g, c, &store, &piece](std::size_t i, std::size_t n, const auto& arithmetic) noexcept {
                  alignas(64) float old[optim::detail::update_chunk];
                  alignas(64) float updated[optim::detail::update_chunk];
                  xax::detail::convert_serial(p + i, old, n);
                  arithmetic(old, g + i, updated, i, n);
                  // The element's index in its leaf keys stochastic rounding, as unsharded.
                  store(p + i, c != nullptr ? c + i : nullptr, old, updated, n, piece.begin + i);
                });
          }
          sent += piece.count * sizeof(H) * (w - 1) * (carried != nullptr ? 2 : 1);
        }
        if (sharded_ && !values.empty()) {
          all_gather_leaf(values.data(), leaf, w);
          if (carried != nullptr) all_gather_leaf(carried, leaf, w);
        }
        ++leaf;
      }
    };
    if constexpr (kahan) {
      for_each_leaf([&]<class M>(M& m, M& c) { update_leaf(m, &c); }, masters, compensation);
    } else {
      for_each_leaf([&]<class M>(M& m) { update_leaf(m, static_cast<M*>(nullptr)); }, masters);
    }
    state_.step = step;
    half_gather_bytes_ = sent;
  }

  // Makes this the optimizer DataParallelMixin::prepare_checkpoint gathers.
  void enroll() {
    if (registry_ == nullptr) return;
    const detail::ZeroRegistry::Entry* live = registry_->live();
    if (live == nullptr || live->optimizer != this) registry_->enroll(entry_for_this());
  }
  detail::ZeroRegistry::Entry entry_for_this() {
    return {this, [this] { gather_for_checkpoint(); }, &layout_,
            [this] { return master_gather_bytes_per_step(); },
            [this]() -> std::optional<std::uint64_t> {
              if (!owns_masters_) return std::nullopt;
              return adopted_digest_;
            }};
  }

  void release_gathered() {
    gathered_step_ = -1;
    std::vector<float>().swap(gathered_first_);
    std::vector<float>().swap(gathered_second_);
    std::vector<float>().swap(gathered_masters_);
  }

  // Writes a whole flat state (N elements, tree order) into the floating leaves of `tree`.
  static void scatter_into(const std::vector<float>& flat, Params& tree) {
    std::size_t offset = 0;
    for_each_leaf(
        [&]<class L>(L& leaf) {
          if constexpr (floating_leaf<L>) {
            auto values = leaf_span(leaf);
            std::copy_n(flat.data() + offset, values.size(), values.data());
            offset += values.size();
          }
        },
        tree);
  }

  void all_gather_masters(const std::vector<float*>& param) const {
    int world = 1;
    check_mpi(MPI_Comm_size(comm_, &world), "MPI_Comm_size");
    const auto w = static_cast<std::size_t>(world);
    for (std::size_t l = 0; l < param.size(); ++l) {
      if (layout_.leaf_sizes()[l] != 0) all_gather_leaf(param[l], l, w);
    }
  }

  // Collective: every rank's shard of floating leaf `leaf` (`data`, the whole leaf in its own type) into
  // every rank's `data`, in place.
  template <class T>
  void all_gather_leaf(T* data, std::size_t leaf, std::size_t world) const {
    check_mpi(MPI_Allgatherv(MPI_IN_PLACE, 0, MPI_DATATYPE_NULL, data, gather_counts_.data() + leaf * world,
                             gather_offsets_.data() + leaf * world, mpi_datatype<T>(), comm_),
              "MPI_Allgatherv");
  }

  Options options_;
  std::vector<optim::LeafSettings> settings_;  // per floating leaf, from the options' parameter groups
  MPI_Comm comm_ = MPI_COMM_NULL;
  bool sharded_ = false;
  int rank_ = 0;
  std::shared_ptr<detail::ZeroRegistry> registry_;
  ZeroShardLayout layout_;
  std::vector<ZeroSegment> segments_;
  std::vector<int> gather_counts_, gather_offsets_;  // [leaf * world + rank]
  State state_;
  // Rank 0, between gather_for_checkpoint and its next step: the whole state, for save_state.
  std::vector<float> gathered_first_, gathered_second_;
  std::int64_t gathered_step_ = -1;
  // ZeRO-1 with sharded masters (adopt_masters): this rank's shard of the fp32 masters, flat in shard order.
  Eigen::VectorXf masters_;
  bool owns_masters_ = false;
  std::uint64_t adopted_digest_ = 0;
  std::size_t owned_gather_bytes_ = 0;
  std::optional<std::size_t> half_gather_bytes_;  // set by step_half_masters, cleared by step
  std::vector<float> gathered_masters_;           // rank 0, between gather_for_checkpoint and its next step
};

}  // namespace xax::distributed
