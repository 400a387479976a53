#pragma once
/// \file
/// Fashion-MNIST (Zalando's 28x28 grey-scale clothing images, 10 classes, 60000 train / 10000 test) from its
/// IDX files, as Debian's `dataset-fashion-mnist` package installs them.
///
///     if (auto dir = xax::find_fashion_mnist()) {
///       xax::ClassificationSplits data = xax::load_fashion_mnist(*dir);  // data.train.features is 784 x
///       60000
///     }

#include <array>
#include <cstdlib>
#include <filesystem>
#include <optional>
#include <string>
#include <string_view>
#include <system_error>
#include <xax/utils/error.hpp>
#include <xax_datasets/dataset.hpp>
#include <xax_datasets/idx.hpp>

namespace xax {

/// Where Debian's `dataset-fashion-mnist` installs the gzipped IDX files.
inline constexpr std::string_view fashion_mnist_debian_dir = "/usr/share/datasets/fashion-mnist";

/// The environment variable that points at another Fashion-MNIST directory; it wins over Debian's.
inline constexpr std::string_view fashion_mnist_dir_variable = "XAX_FASHION_MNIST_DIR";

namespace detail {

inline constexpr std::array<std::string_view, 4> fashion_mnist_stems{
    "train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"};

/// The gzipped file if present, else the plain one; nullopt when neither exists.
inline std::optional<std::filesystem::path> fashion_mnist_file(const std::filesystem::path& dir,
                                                               std::string_view stem) {
  std::error_code error;
  for (const char* suffix : {".gz", ""}) {
    std::filesystem::path candidate = dir / (std::string(stem) + suffix);
    if (std::filesystem::is_regular_file(candidate, error)) return candidate;
  }
  return std::nullopt;
}

inline bool has_fashion_mnist_files(const std::filesystem::path& dir) {
  for (std::string_view stem : fashion_mnist_stems) {
    if (!fashion_mnist_file(dir, stem)) return false;
  }
  return true;
}

}  // namespace detail

/// The directory holding all four Fashion-MNIST files: $XAX_FASHION_MNIST_DIR when set, otherwise Debian's
/// /usr/share/datasets/fashion-mnist; nullopt when the chosen directory lacks any of the files.
inline std::optional<std::filesystem::path> find_fashion_mnist() {
  // NOLINTNEXTLINE(concurrency-mt-unsafe): read once at start-up, before any thread exists.
  if (const char* variable = std::getenv(std::string(fashion_mnist_dir_variable).c_str());
      variable != nullptr && *variable != '\0') {
    if (detail::has_fashion_mnist_files(variable)) return std::filesystem::path(variable);
    return std::nullopt;
  }
  if (detail::has_fashion_mnist_files(fashion_mnist_debian_dir)) {
    return std::filesystem::path(fashion_mnist_debian_dir);
  }
  return std::nullopt;
}

/// Loads the train and test splits from `dir` (each file gzipped or plain). Images become 784 x N floats in
/// [0, 1], one per column; labels are int32 in [0, 10). Throws DataError naming the missing or malformed
/// file.
inline ClassificationSplits load_fashion_mnist(const std::filesystem::path& dir) {
  constexpr int classes = 10;
  const auto require = [&dir](std::string_view stem) {
    if (auto file = detail::fashion_mnist_file(dir, stem)) return *file;
    throw DataError(
        "Fashion-MNIST: neither '" + (dir / stem).string() + ".gz' nor '" + (dir / stem).string() +
        "' exists; install Debian's dataset-fashion-mnist (apt-get install dataset-fashion-mnist), "
        "point " +
        std::string(fashion_mnist_dir_variable) +
        " at a directory holding the four IDX files, or use the synthetic data set");
  };
  const auto load_split = [&](std::string_view images_stem, std::string_view labels_stem) {
    const std::filesystem::path images = require(images_stem);
    const std::filesystem::path labels = require(labels_stem);
    ClassificationDataset split;
    split.features = read_idx_images(images);
    split.labels = read_idx_labels(labels, classes);
    split.num_classes = classes;
    if (split.features.rows() != 28 * 28) {
      throw DataError("IDX file '" + images.string() + "': images have " +
                      std::to_string(split.features.rows()) +
                      " pixels, Fashion-MNIST's have 784 (28x28); is this another data set?");
    }
    if (split.features.cols() != split.labels.size()) {
      throw DataError("Fashion-MNIST: '" + images.string() + "' holds " +
                      std::to_string(split.features.cols()) + " images but '" + labels.string() + "' holds " +
                      std::to_string(split.labels.size()) +
                      " labels; the files come from different splits or one is damaged");
    }
    return split;
  };
  ClassificationSplits splits;
  splits.name = "fashion-mnist";
  splits.train = load_split(detail::fashion_mnist_stems[0], detail::fashion_mnist_stems[1]);
  splits.test = load_split(detail::fashion_mnist_stems[2], detail::fashion_mnist_stems[3]);
  return splits;
}

}  // namespace xax
