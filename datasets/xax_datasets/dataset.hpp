#pragma once
/// \file
/// An in-memory classification data set: one sample per column, as the layers in xax/nn take their inputs.

#include <xax/detail/eigen.hpp>

#include <cstdint>
#include <string>
#include <xax/utils/error.hpp>

namespace xax {

/// Samples and their class labels. `features` is features x samples (column-major, so a mini-batch is a
/// contiguous block of columns); `labels[i]` is the class of column i, in [0, num_classes).
struct ClassificationDataset {
  Eigen::MatrixXf features;
  Eigen::VectorX<std::int32_t> labels;
  int num_classes = 0;

  /// The number of samples.
  [[nodiscard]] Eigen::Index size() const { return features.cols(); }
  /// The number of features per sample (784 for 28x28 images).
  [[nodiscard]] Eigen::Index feature_count() const { return features.rows(); }
};

/// A named train/test pair, e.g. Fashion-MNIST's 60000/10000 split.
struct ClassificationSplits {
  std::string name;
  ClassificationDataset train;
  ClassificationDataset test;
};

/// Throws DataError, quoting `what`, when the samples and labels disagree in count or a label is out of
/// range.
inline void validate_dataset(const ClassificationDataset& data, const std::string& what) {
  if (data.features.cols() != data.labels.size()) {
    throw DataError(what + ": " + std::to_string(data.features.cols()) + " samples but " +
                    std::to_string(data.labels.size()) + " labels; the two must come from the same split");
  }
  for (Eigen::Index i = 0; i < data.labels.size(); ++i) {
    if (data.labels[i] < 0 || data.labels[i] >= data.num_classes) {
      throw DataError(what + ": label " + std::to_string(data.labels[i]) + " of sample " + std::to_string(i) +
                      " is outside [0, " + std::to_string(data.num_classes) + ")");
    }
  }
}

}  // namespace xax
