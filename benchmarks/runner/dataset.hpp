#pragma once
// Choosing and loading the data set: Fashion-MNIST where Debian's package (or $XAX_FASHION_MNIST_DIR)
// provides it, the synthetic stand-in otherwise, and always saying which.

#include <cstdint>
#include <string>
#include <xax/utils/error.hpp>
#include <xax_datasets/dataset.hpp>
#include <xax_datasets/fashion_mnist.hpp>
#include <xax_datasets/synthetic.hpp>

#include "report/format.hpp"
#include "runner/memory.hpp"
#include "runner/options.hpp"

namespace xax_bench {

/// The data the training runs use, and a sentence on where it came from.
struct LoadedData {
  xax::ClassificationSplits splits;
  std::string note;
};

namespace detail {

// Keeps the first `samples` examples (0: all). More than the split holds is refused rather than quietly
// running on fewer than asked for.
inline void keep_first(xax::ClassificationDataset& split, std::int64_t samples, const std::string& option,
                       const std::string& split_name) {
  if (samples > split.size()) {
    throw xax::ConfigError(option + " " + std::to_string(samples) + " is more than the " +
                           std::to_string(split.size()) + " samples of the " + split_name +
                           "; accepted: 0 (all) to " + std::to_string(split.size()));
  }
  if (samples <= 0 || samples == split.size()) return;
  split.features = split.features.leftCols(samples).eval();
  split.labels = split.labels.head(samples).eval();
}

}  // namespace detail

/// Throws xax::ConfigError when the synthetic set `synthetic` asks for (made in memory whole: features x
/// samples floats per split) exceeds `budget`, the memory this process may use. Refused before it is made:
/// the alternative is std::bad_alloc, or, where the kernel overcommits, the OOM killer.
inline void require_synthetic_fits(const xax::SyntheticClassificationOptions& synthetic,
                                   const MemoryBudget& budget) {
  const double samples =
      static_cast<double>(synthetic.train_samples) + static_cast<double>(synthetic.test_samples);
  const double bytes =
      samples * (static_cast<double>(synthetic.features) * sizeof(float) + sizeof(std::int32_t));
  if (bytes <= static_cast<double>(budget.bytes)) return;
  throw xax::ConfigError("--train-samples " + std::to_string(synthetic.train_samples) +
                         " and --test-samples " + std::to_string(synthetic.test_samples) +
                         " make a synthetic set of " + gib(bytes) + ", more than " + budget.describe() +
                         "; give fewer samples");
}

/// Loads what `options.dataset` asks for. Throws xax::DataError when Fashion-MNIST is asked for and missing
/// or corrupt, and xax::ConfigError for a synthetic set larger than the memory this process may use.
inline LoadedData load_data(const Options& options) {
  LoadedData data;
  const std::optional<std::filesystem::path> fashion_dir = xax::find_fashion_mnist();
  if (options.dataset == "fashion-mnist" && !fashion_dir) {
    throw xax::DataError(
        "--dataset fashion-mnist: the data is not installed; on Debian: apt-get install "
        "dataset-fashion-mnist "
        "(files in " +
        std::string(xax::fashion_mnist_debian_dir) + "), or set " +
        std::string(xax::fashion_mnist_dir_variable) +
        " to a directory holding the four IDX files, or use "
        "--dataset synthetic");
  }
  if (options.dataset != "synthetic" && fashion_dir) {
    data.splits = xax::load_fashion_mnist(*fashion_dir);
    data.note = "Fashion-MNIST from " + fashion_dir->string();
  } else {
    xax::SyntheticClassificationOptions synthetic;
    if (options.train_samples > 0) synthetic.train_samples = options.train_samples;
    if (options.test_samples > 0) synthetic.test_samples = options.test_samples;
    synthetic.seed += options.seed;
    require_synthetic_fits(synthetic, memory_budget());
    data.splits = xax::make_synthetic_classification(synthetic);
    data.note = options.dataset == "synthetic"
                    ? "synthetic stand-in for Fashion-MNIST, as asked (--dataset synthetic)"
                    : "synthetic stand-in: Fashion-MNIST is not installed (Debian: apt-get install "
                      "dataset-fashion-mnist)";
  }
  detail::keep_first(data.splits.train, options.train_samples, "--train-samples",
                     data.splits.name + " train split");
  detail::keep_first(data.splits.test, options.test_samples, "--test-samples",
                     data.splits.name + " test split");
  xax::validate_dataset(data.splits.train, data.splits.name + " train split");
  xax::validate_dataset(data.splits.test, data.splits.name + " test split");
  data.note += "; " + std::to_string(data.splits.train.size()) + " train / " +
               std::to_string(data.splits.test.size()) + " test samples";
  return data;
}

}  // namespace xax_bench
