// Writes the seed corpus of checkpoint_fuzzer: small valid checkpoints written by the library, one of each
// shape of content the fuzzer restores. Usage: make_checkpoint_corpus <directory>
#include <xax/task/checkpoint.hpp>

#include <array>
#include <cstdint>
#include <cstdio>
#include <filesystem>
#include <string>

#include "checkpoint_fuzz_model.hpp"

int main(int argc, char** argv) {
  if (argc != 2) {
    std::fprintf(stderr, "usage: %s <corpus directory>\n", argv[0]);
    return 2;
  }
  const std::filesystem::path dir = argv[1];
  std::filesystem::create_directories(dir);

  xax::CheckpointWriter().write(dir / "empty.xax");

  xax::CheckpointWriter model;
  model.add_tree("model", xax_fuzz::make_fuzz_model<float>());
  model.add_tree("loop", std::array<std::int64_t, 3>{11, 1, 3});
  model.add_string("note", "seed");
  model.write(dir / "model_float32.xax");

  xax::CheckpointWriter half;
  half.add_tree("half", xax_fuzz::make_fuzz_model<xax::bfloat16>());
  auto reshaped = xax_fuzz::make_fuzz_model<float>();
  reshaped.layers.resize(1);
  reshaped.layers[0].resize(0, 4);  // an empty leaf
  reshaped.conv.resize(1, 3, 1);
  reshaped.conv.setConstant(-0.5f);  // resize() leaves the elements unset; the seeds must be reproducible
  half.add_string("loop.rng", "1 2 3");
  half.add_tree("model", reshaped);
  half.write(dir / "model_bfloat16_reshaped.xax");

  // Row-major leaves (stored column-major), a matrix with compile-time maximum sizes and bool elements.
  xax::CheckpointWriter layouts;
  layouts.add_tree("layouts", xax_fuzz::make_fuzz_layouts());
  layouts.write(dir / "layouts.xax");

  xax::CheckpointWriter strings;
  strings.add_string("note", std::string("binary\0safe", 11));
  strings.add_string("", "");
  strings.add_tree("model.step", std::int64_t{7});
  strings.write(dir / "strings.xax");
  return 0;
}
