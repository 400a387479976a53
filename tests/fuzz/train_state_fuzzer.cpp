// libFuzzer target for what a training checkpoint holds beyond its trees' bytes: TrainMixin::load_checkpoint
// on a mixed-precision task with a dynamic loss scale and AdamW, which reads the loop position and the
// generators' text, then TrainStep's policy, optimizer name and state, loss scale and step counters. (The
// checkpoint_fuzzer covers the file format itself.)
//
// The input is a list of patches to a valid checkpoint that the task wrote after three steps: each patch is
// an entry (first byte, modulo the entry count), an offset into its payload (two bytes), a length byte and
// that many bytes, which overwrite the payload from the offset (growing it where they run past its end); a
// length byte of 255 truncates the payload at the offset instead. The checkpoint is then rewritten with a
// valid checksum, so that mutations reach the loaders' checks rather than the CRC.
//
// Every load must either throw xax::CheckpointError and leave the task exactly as it was (params, position,
// loss scale, generator), or succeed; then one more step must run. Anything else (another exception, a
// crash, a sanitizer report such as an overflowing step count) is a bug.
#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <numeric>
#include <random>
#include <string>
#include <vector>
#include <xax/utils/error.hpp>

#include "../checkpoint_bytes.hpp"
#include "../train_test_task.hpp"
#include "scratch_file.hpp"

namespace {

xax_test::TaskConfig fuzz_config(std::int64_t max_steps) {
  xax_test::TaskConfig config = xax_test::default_config();
  config.enable_mixed_precision = true;
  config.precision_policy = "mixed";
  config.loss_scaling = "dynamic";
  config.loss_scale_growth_interval = 2;
  config.max_steps = max_steps;
  return config;
}

const xax_test::Data& fuzz_data() {
  static const xax_test::Data data = xax_test::make_data(96);
  return data;
}

const std::filesystem::path& checkpoint_file() {
  static const xax_fuzz::ScratchFile file("xax_train_state_fuzzer.ckpt");
  return file.path();
}

/// The entries of the checkpoint a task writes after three steps, made once.
const std::vector<xax_test::RawEntry>& valid_entries() {
  static const std::vector<xax_test::RawEntry> entries = [] {
    xax_test::ClassifierTask written(fuzz_config(3), fuzz_data());
    written.fit();
    written.save_checkpoint(checkpoint_file());
    return xax_test::entries_of(xax_test::read_bytes(checkpoint_file()));
  }();
  return entries;
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  std::vector<xax_test::RawEntry> entries = valid_entries();
  std::size_t at = 0;
  while (at + 4 <= size) {
    xax_test::RawEntry& entry = entries[data[at] % entries.size()];
    const std::size_t offset =
        std::min<std::size_t>(entry.payload.size(), static_cast<std::size_t>(data[at + 1]) |
                                                        static_cast<std::size_t>(data[at + 2]) << 8);
    const std::size_t length = data[at + 3];
    at += 4;
    if (length == 255) {
      entry.payload.resize(offset);
      continue;
    }
    const std::size_t count = std::min(length, size - at);
    if (entry.payload.size() < offset + count) entry.payload.resize(offset + count);
    std::memcpy(entry.payload.data() + offset, data + at, count);
    at += count;
  }
  xax_test::write_bytes(checkpoint_file(), xax_test::checkpoint_of(entries));

  xax_test::ClassifierTask live(fuzz_config(1), fuzz_data());
  live.fit();
  const std::vector<float> params = xax_test::flat(live.params_float32());
  const std::int64_t steps = live.fit_steps();
  const float scale = live.current_loss_scale();
  const std::mt19937_64 rng = live.rng();
  try {
    live.load_checkpoint(checkpoint_file());
  } catch (const xax::CheckpointError&) {
    if (!xax_test::same_bits(params, xax_test::flat(live.params_float32())) || live.fit_steps() != steps ||
        live.current_loss_scale() != scale || !(live.rng() == rng)) {
      std::abort();  // a refused checkpoint changed the task
    }
    return 0;
  }
  // The step after a resume: the step counters, the optimizer state and the loss scale are used for real.
  std::vector<std::int64_t> examples(32);
  std::iota(examples.begin(), examples.end(), std::int64_t{0});
  live.train_step(live.make_batch(examples));
  return 0;
}
