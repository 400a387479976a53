#pragma once
/// \file
/// A deterministic synthetic classification task shaped like Fashion-MNIST (784 features in [0, 1], 10
/// classes, 60000/10000 samples by default), for machines without the real data and for fast tests.
///
/// Each class has a prototype in a small latent space; a sample is its class prototype plus Gaussian noise,
/// mapped to pixels by one fixed random projection, plus pixel noise, clipped to [0, 1]. The classes overlap,
/// so a model learns it to a high but imperfect accuracy (an MLP reaches about 90 %), and precision
/// differences can show. The same options give bit-identical data on every platform: the generator is a
/// hand-written SplitMix64 with Box-Muller, since std's distributions differ between standard libraries.

#include <xax/detail/eigen.hpp>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <numbers>
#include <string>
#include <xax/detail/format.hpp>
#include <xax/detail/random.hpp>
#include <xax/utils/error.hpp>
#include <xax_datasets/dataset.hpp>

namespace xax {

/// The shape and difficulty of make_synthetic_classification()'s task.
struct SyntheticClassificationOptions {
  Eigen::Index features = 784;
  int classes = 10;
  Eigen::Index train_samples = 60000;
  Eigen::Index test_samples = 10000;
  Eigen::Index latent_dim = 16;
  float latent_noise = 1.1f;  ///< spread of a class around its prototype, in units of the prototypes' spread
  float pixel_noise = 0.1f;   ///< independent noise added to every pixel
  std::uint64_t seed = 20261128;
};

namespace detail {

inline ClassificationDataset synthetic_split(const SyntheticClassificationOptions& options,
                                             const Eigen::MatrixXf& prototypes,
                                             const Eigen::MatrixXf& projection, Eigen::Index samples,
                                             SplitMix64& rng) {
  ClassificationDataset split;
  split.num_classes = options.classes;
  split.labels.resize(samples);
  Eigen::MatrixXf latent(options.latent_dim, samples);
  for (Eigen::Index s = 0; s < samples; ++s) {
    const int label = rng.below(options.classes);
    split.labels[s] = label;
    for (Eigen::Index k = 0; k < options.latent_dim; ++k) {
      latent(k, s) = prototypes(k, label) + options.latent_noise * static_cast<float>(rng.normal());
    }
  }
  split.features.noalias() = projection * latent;
  for (Eigen::Index s = 0; s < samples; ++s) {
    for (Eigen::Index f = 0; f < options.features; ++f) {
      const float pixel =
          0.5f + split.features(f, s) + options.pixel_noise * static_cast<float>(rng.normal());
      split.features(f, s) = std::clamp(pixel, 0.0f, 1.0f);
    }
  }
  return split;
}

}  // namespace detail

/// Builds the synthetic train and test splits. Throws ConfigError for non-positive sizes or negative noise.
inline ClassificationSplits make_synthetic_classification(
    const SyntheticClassificationOptions& options = {}) {
  const auto require_positive = [](const char* name, Eigen::Index value) {
    if (value < 1) {
      throw ConfigError(std::string("synthetic data set: ") + name + " is " + std::to_string(value) +
                        "; give 1 or more");
    }
  };
  require_positive("features", options.features);
  require_positive("train_samples", options.train_samples);
  require_positive("test_samples", options.test_samples);
  require_positive("latent_dim", options.latent_dim);
  if (options.classes < 2) {
    throw ConfigError("synthetic data set: classes is " + std::to_string(options.classes) +
                      "; give 2 or more");
  }
  if (!(options.latent_noise >= 0.0f) || !(options.pixel_noise >= 0.0f) ||
      !std::isfinite(options.latent_noise) || !std::isfinite(options.pixel_noise)) {
    throw ConfigError("synthetic data set: latent_noise and pixel_noise must be finite and >= 0, got " +
                      detail::shortest_text(options.latent_noise) + " and " +
                      detail::shortest_text(options.pixel_noise));
  }

  detail::SplitMix64 rng(options.seed);
  Eigen::MatrixXf prototypes(options.latent_dim, options.classes);
  for (float& value : prototypes.reshaped()) value = static_cast<float>(rng.normal());
  // Scaled so that a typical sample's pixels spread about +-0.15 around 0.5: image-like, and rarely clipped.
  const float projection_scale = 0.15f / std::sqrt(static_cast<float>(options.latent_dim) *
                                                   (1.0f + options.latent_noise * options.latent_noise));
  Eigen::MatrixXf projection(options.features, options.latent_dim);
  for (float& value : projection.reshaped()) value = projection_scale * static_cast<float>(rng.normal());

  ClassificationSplits splits;
  splits.name = "synthetic";
  splits.train = detail::synthetic_split(options, prototypes, projection, options.train_samples, rng);
  splits.test = detail::synthetic_split(options, prototypes, projection, options.test_samples, rng);
  return splits;
}

}  // namespace xax
