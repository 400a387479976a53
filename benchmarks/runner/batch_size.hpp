#pragma once
// The batch size a training run uses, given what the command line asked for and the train split it got.

#include <cstdint>
#include <string>
#include <string_view>
#include <xax/utils/error.hpp>

namespace xax_bench {

/// The batch a run trains with, out of `train_samples` examples. A default larger than the train split (256,
/// or the memory probe's 8192, against a small --train-samples) is reduced to the split, so the defaults work
/// with any split and the run reports the batch it used; a batch the user typed is never changed behind their
/// back: it must fit. `option` names it in the message ("--batch-size").
inline std::int64_t effective_batch_size(std::int64_t batch, bool given, std::string_view option,
                                         std::int64_t train_samples) {
  if (batch <= train_samples) return batch;
  if (!given) return train_samples;
  throw xax::ConfigError(
      std::string(option) + " " + std::to_string(batch) + " is larger than the " +
      std::to_string(train_samples) + " training samples (--train-samples, 0: the whole split); accepted: " +
      std::string(option) + " from 1 to " + std::to_string(train_samples) + ", or more training samples");
}

}  // namespace xax_bench
