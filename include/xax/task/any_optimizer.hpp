#pragma once
/// \file
/// The door through which TrainStep drives its optimizer: any type meeting `xax::optim::optimizer_for`
/// (the built-in AdamW and Sgd included) behind one small virtual interface.
///
/// What TrainStep needs of an optimizer `O` over the update tree `Params` (params_type<update_type>):
/// - `o.step(params, grads)`: one update of the fp32 (or double) params from the unscaled gradients;
/// - `o.state()`, const and non-const, returning a tree by reference: checkpoints save it as
///   `<prefix>.optimizer_state` and restore it in place (an integral `state().step`, if there is one, is
///   checked to be >= 0 on load). The state must own its storage (Eigen matrices, not Maps): a load reads
///   into a copy of the optimizer and adopts it only once everything is read, which a copy sharing storage
///   with the live state would defeat;
/// - `o.set_learning_rate(double)`, which schedules call between steps.
/// Optionally:
/// - `o.step(params, grads, copy)` that also writes the updated params rounded into `copy` (another floating
///   type, same shapes) in the same pass; without it TrainStep casts the params into the copy afterwards;
/// - `o.name()`, recorded in checkpoints and checked on load ("custom" when absent);
/// - `o.learning_rate()` or `o.options().learning_rate`, which TrainStep::learning_rate() reports;
/// - `o.save_state(writer, entry, like)` and `o.load_state(reader, entry, like)` (`like`: a tree shaped like
///   the params), which replace saving and restoring `state()` as a tree: an optimizer whose state is sharded
///   over processes (xax::distributed::ZeroOptimizer) writes and reads the whole, unsharded state this way.
/// - Owning the masters (ZeRO-1 with sharded masters, xax::distributed::ZeroOptimizer): `bool
///   o.adopt_masters(const Params& whole)` keeps what the optimizer needs of the whole masters (its shard)
///   and returns whether it now owns them. TrainStep offers them only when its compute copy is a tree of its
///   own (fp32 masters, narrower compute), after every reset and load; when the optimizer accepts, TrainStep
///   frees its masters and from then on calls `o.step_owned_masters(grads, copy)` (update the owned masters
///   and write the whole compute copy, rounded to nearest), `o.gather_masters(whole)` (the whole masters;
///   collective for a sharded optimizer), `o.save_masters(writer, entry, like)` (write the whole masters as
///   a tree shaped like `like`) and `o.master_bytes()` (what the owned masters hold). An optimizer without
///   adopt_masters never owns them, at no cost.

#include <concepts>
#include <cstddef>
#include <memory>
#include <optional>
#include <string>
#include <type_traits>
#include <utility>
#include <xax/optim/optimizer.hpp>
#include <xax/task/checkpoint.hpp>
#include <xax/utils/error.hpp>
#include <xax/utils/tree.hpp>

namespace xax {

/// An optimizer TrainStep can run over `Params` and checkpoint: optim::optimizer_for, with a state tree that
/// can be read back in place.
template <class O, class Params>
concept train_optimizer = optim::optimizer_for<O, Params> && std::move_constructible<O> &&
    std::copy_constructible<O> && requires(O& o, const O& c) {
  requires std::is_lvalue_reference_v<decltype(o.state())>;
  requires !std::is_const_v<std::remove_reference_t<decltype(o.state())>>;
  requires tree<std::remove_cvref_t<decltype(c.state())>>;
};

namespace detail {

/// A type-erased optimizer over the update tree `Params`; `Copy` is the tree a fused step may also write
/// (the compute copy of fp32 masters, or half-precision masters updated through an fp32 work copy when the
/// optimizer has no step_half_masters).
template <class Params, class Copy>
class AnyOptimizer {
 public:
  virtual ~AnyOptimizer() = default;
  [[nodiscard]] virtual std::unique_ptr<AnyOptimizer> clone() const = 0;
  /// One update. Writes `copy` too when it is not null and the optimizer fuses it; returns whether it did.
  virtual bool step(Params& params, const Params& grads, Copy* copy) = 0;
  /// One update of half-precision masters `masters` in place, without an fp32 copy of them, for an optimizer
  /// that has step_half_masters (optim::AdamW, optim::Sgd); returns false, having changed nothing, for one
  /// that has not (TrainStep then updates the masters through an fp32 copy).
  virtual bool step_half_masters(Copy& masters, const Params& grads, const optim::HalfMasterUpdate& update,
                                 Copy* compensation) = 0;
  virtual void set_learning_rate(double learning_rate) = 0;
  [[nodiscard]] virtual std::optional<double> learning_rate() const = 0;
  [[nodiscard]] virtual std::string name() const = 0;
  [[nodiscard]] virtual std::size_t state_bytes() const = 0;
  /// `like`: a tree shaped like the params, for optimizers that save more than their state() tree.
  virtual void save_state(CheckpointWriter& writer, const std::string& entry, const Params& like) const = 0;
  /// A copy of this optimizer whose state is read from `entry`; this one is unchanged (CheckpointError when
  /// the entry does not fit).
  [[nodiscard]] virtual std::unique_ptr<AnyOptimizer> with_loaded_state(const CheckpointReader& reader,
                                                                        const std::string& entry,
                                                                        const Params& like) const = 0;
  /// Masters owned by the optimizer (see the file comment); an optimizer that cannot own them returns false.
  virtual bool adopt_masters(const Params& whole) = 0;
  /// After adopt_masters returned true: one update of the owned masters that also writes the whole `copy`.
  virtual void step_owned_masters(const Params& grads, Copy& copy) = 0;
  virtual void gather_masters(Params& whole) const = 0;
  virtual void save_masters(CheckpointWriter& writer, const std::string& entry, const Params& like) const = 0;
  [[nodiscard]] virtual std::size_t master_bytes() const = 0;

 protected:
  AnyOptimizer() = default;
  AnyOptimizer(const AnyOptimizer&) = default;
  AnyOptimizer& operator=(const AnyOptimizer&) = default;
};

template <class Params, class Copy, class O>
class OptimizerModel final : public AnyOptimizer<Params, Copy> {
 public:
  explicit OptimizerModel(O optimizer) : optimizer_(std::move(optimizer)) {}

  [[nodiscard]] std::unique_ptr<AnyOptimizer<Params, Copy>> clone() const override {
    return std::make_unique<OptimizerModel>(*this);
  }
  bool step(Params& params, const Params& grads, Copy* copy) override {
    if constexpr (requires { optimizer_.step(params, grads, *copy); }) {
      if (copy != nullptr) {
        optimizer_.step(params, grads, *copy);
        return true;
      }
    }
    optimizer_.step(params, grads);
    return false;
  }
  bool step_half_masters(Copy& masters, const Params& grads, const optim::HalfMasterUpdate& update,
                         Copy* compensation) override {
    if constexpr (requires { optimizer_.step_half_masters(masters, grads, update, compensation); }) {
      optimizer_.step_half_masters(masters, grads, update, compensation);
      return true;
    } else {
      return false;
    }
  }
  void set_learning_rate(double learning_rate) override { optimizer_.set_learning_rate(learning_rate); }
  [[nodiscard]] std::optional<double> learning_rate() const override {
    if constexpr (requires {
                    { optimizer_.learning_rate() } -> std::convertible_to<double>;
                  }) {
      return static_cast<double>(optimizer_.learning_rate());
    } else if constexpr (requires {
                           { optimizer_.options().learning_rate } -> std::convertible_to<double>;
                         }) {
      return static_cast<double>(optimizer_.options().learning_rate);
    } else {
      return std::nullopt;
    }
  }
  [[nodiscard]] std::string name() const override {
    if constexpr (requires { optimizer_.name(); }) {
      // A name() of another type must not pass for no name: the checkpoint check on load would then be lost.
      static_assert(
          std::constructible_from<std::string, decltype(optimizer_.name())>,
          "xax: an optimizer's name() must return text (std::string, std::string_view or const char*)");
      return std::string(optimizer_.name());
    } else {
      return "custom";
    }
  }
  [[nodiscard]] std::size_t state_bytes() const override { return payload_bytes(optimizer_.state()); }
  void save_state(CheckpointWriter& writer, const std::string& entry, const Params& like) const override {
    if constexpr (requires { optimizer_.save_state(writer, entry, like); }) {
      optimizer_.save_state(writer, entry, like);
    } else {
      writer.add_tree(entry, optimizer_.state());
    }
  }
  [[nodiscard]] std::unique_ptr<AnyOptimizer<Params, Copy>> with_loaded_state(
      const CheckpointReader& reader, const std::string& entry, const Params& like) const override {
    auto loaded = std::make_unique<OptimizerModel>(*this);
    if constexpr (requires(O & o) { o.load_state(reader, entry, like); }) {
      loaded->optimizer_.load_state(reader, entry, like);
      return loaded;
    }
    auto& state = loaded->optimizer_.state();
    reader.read_tree(entry, state);
    if constexpr (requires { requires std::integral<std::remove_cvref_t<decltype(state.step)>>; }) {
      detail::require_countable_step(state.step, entry + ".step");
    }
    if constexpr (requires { loaded->optimizer_.require_reachable_state(entry); }) {
      loaded->optimizer_.require_reachable_state(entry);
    }
    return loaded;
  }
  bool adopt_masters(const Params& whole) override {
    if constexpr (requires { optimizer_.adopt_masters(whole); }) {
      return optimizer_.adopt_masters(whole);
    } else {
      return false;
    }
  }
  void step_owned_masters(const Params& grads, Copy& copy) override {
    if constexpr (requires { optimizer_.step_owned_masters(grads, copy); }) {
      optimizer_.step_owned_masters(grads, copy);
    } else {
      throw Error("xax::TrainStep: optimizer '" + name() + "' does not own the masters (no adopt_masters)");
    }
  }
  void gather_masters(Params& whole) const override {
    if constexpr (requires { optimizer_.gather_masters(whole); }) {
      optimizer_.gather_masters(whole);
    } else {
      throw Error("xax::TrainStep: optimizer '" + name() + "' does not own the masters (no adopt_masters)");
    }
  }
  void save_masters(CheckpointWriter& writer, const std::string& entry, const Params& like) const override {
    if constexpr (requires { optimizer_.save_masters(writer, entry, like); }) {
      optimizer_.save_masters(writer, entry, like);
    } else {
      throw Error("xax::TrainStep: optimizer '" + name() + "' does not own the masters (no adopt_masters)");
    }
  }
  [[nodiscard]] std::size_t master_bytes() const override {
    if constexpr (requires {
                    { optimizer_.master_bytes() } -> std::convertible_to<std::size_t>;
                  }) {
      return optimizer_.master_bytes();
    } else {
      return 0;
    }
  }

  [[nodiscard]] O& get() { return optimizer_; }
  [[nodiscard]] const O& get() const { return optimizer_; }

 private:
  O optimizer_;
};

/// An AnyOptimizer that copies by cloning, so that a train state holding one stays copyable.
template <class Params, class Copy>
class OptimizerBox {
 public:
  OptimizerBox() = default;
  explicit OptimizerBox(std::unique_ptr<AnyOptimizer<Params, Copy>> held) : held_(std::move(held)) {}
  OptimizerBox(const OptimizerBox& other) : held_(other.held_ ? other.held_->clone() : nullptr) {}
  OptimizerBox& operator=(const OptimizerBox& other) {
    if (this != &other) held_ = other.held_ ? other.held_->clone() : nullptr;
    return *this;
  }
  OptimizerBox(OptimizerBox&&) noexcept = default;
  OptimizerBox& operator=(OptimizerBox&&) noexcept = default;
  ~OptimizerBox() = default;

  template <class O>
  static OptimizerBox hold(O optimizer) {
    return OptimizerBox(std::make_unique<OptimizerModel<Params, Copy, O>>(std::move(optimizer)));
  }

  AnyOptimizer<Params, Copy>* operator->() { return held_.get(); }
  const AnyOptimizer<Params, Copy>* operator->() const { return held_.get(); }

  /// The held optimizer if it is an `O`, else null.
  template <class O>
  [[nodiscard]] const O* get_if() const {
    const auto* model = dynamic_cast<const OptimizerModel<Params, Copy, O>*>(held_.get());
    return model != nullptr ? &model->get() : nullptr;
  }

 private:
  std::unique_ptr<AnyOptimizer<Params, Copy>> held_;
};

}  // namespace detail
}  // namespace xax
