// libFuzzer target for the checkpoint reader. The input is a checkpoint whose last 4 bytes (the CRC-32) are
// replaced by the checksum of the rest, so that mutations get past the checksum and reach the parser's own
// checks; the seeds in corpus/checkpoint are valid checkpoints written by the library. Every input must
// either parse or throw xax::CheckpointError, and a parsed checkpoint must either restore the trees below (in
// both shape modes) or throw xax::CheckpointError. Anything else (another exception, a crash, a sanitizer
// report) is a bug.
#include <xax/task/checkpoint.hpp>

#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <map>
#include <string>
#include <vector>

#include "checkpoint_fuzz_model.hpp"

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  std::string bytes(reinterpret_cast<const char*>(data), size);
  if (bytes.size() >= sizeof(std::uint32_t)) {
    const std::size_t body = bytes.size() - sizeof(std::uint32_t);
    const std::uint32_t crc = xax::detail::crc32_of(bytes, body);
    std::memcpy(bytes.data() + body, &crc, sizeof(crc));
  }
  try {
    const xax::CheckpointReader reader = xax::CheckpointReader::from_bytes(bytes);
    for (const xax::LeafShapes shapes : {xax::LeafShapes::exact, xax::LeafShapes::from_checkpoint}) {
      xax_fuzz::FuzzModel model = xax_fuzz::make_fuzz_model();
      const xax_fuzz::FuzzModel before = model;
      try {
        reader.read_tree("model", model, shapes);
      } catch (const xax::CheckpointError&) {
        // A refused read leaves the tree as it was.
        if (!xax_fuzz::bitwise_equal(model, before)) std::abort();
      }
      std::array<std::int64_t, 3> loop{};
      try {
        reader.read_tree("loop", loop, shapes);
      } catch (const xax::CheckpointError&) {
      }
      xax_fuzz::FuzzModel<xax::bfloat16> half;
      try {
        reader.read_tree("half", half, shapes);
      } catch (const xax::CheckpointError&) {
      }
      xax_fuzz::FuzzLayouts layouts = xax_fuzz::make_fuzz_layouts();
      const xax_fuzz::FuzzLayouts layouts_before = layouts;
      try {
        reader.read_tree("layouts", layouts, shapes);
      } catch (const xax::CheckpointError&) {
        if (!xax_fuzz::bitwise_equal(layouts, layouts_before)) std::abort();
      }
    }
    for (const char* name : {"note", "model.step", "loop.rng", ""}) {
      try {
        (void)reader.read_string(name);
      } catch (const xax::CheckpointError&) {
      }
    }
  } catch (const xax::CheckpointError&) {
  }
  return 0;
}
