// libFuzzer target for the IDX reader. The first byte chooses how the rest reaches the reader: bit 0 clear,
// as the file's bytes (plain IDX, or any gzip stream the fuzzer builds); bit 0 set, gzip-compressed by this
// harness first (with zlib), so that the IDX parser behind the decompressor is explored too. Any file either
// reads to an array whose bytes match its header, or throws xax::DataError; the image and label readers
// likewise. Anything else (another exception, a crash, a sanitizer report) is a bug.
#include <xax_datasets/idx.hpp>

#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <string>
#include <system_error>

#include "scratch_file.hpp"

namespace {

const std::filesystem::path& scratch_file() {
  static const xax_fuzz::ScratchFile file("xax_idx_fuzzer.idx");
  return file.path();
}

void write_file(const std::uint8_t* data, std::size_t size, bool gzip) {
#if defined(XAX_HAS_ZLIB) && XAX_HAS_ZLIB
  if (gzip) {
    gzFile file = gzopen(scratch_file().c_str(), "wb");
    if (file == nullptr) std::abort();
    if (size != 0 && gzwrite(file, data, static_cast<unsigned>(size)) != static_cast<int>(size)) std::abort();
    if (gzclose(file) != Z_OK) std::abort();
    return;
  }
#else
  static_cast<void>(gzip);
#endif
  std::ofstream out(scratch_file(), std::ios::binary | std::ios::trunc);
  out.write(reinterpret_cast<const char*>(data), static_cast<std::streamsize>(size));
  if (!out) std::abort();
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  if (size == 0) return 0;
  write_file(data + 1, size - 1, (data[0] & 1u) != 0);
  xax::IdxArray array;
  try {
    array = xax::read_idx(scratch_file());
  } catch (const xax::DataError&) {
    return 0;
  }
  if (array.shape.empty() || array.bytes.size() != array.element_count() * xax::idx_type_size(array.type)) {
    std::abort();
  }
  // The image and label readers read the file again; only where it is of their type and rank, which are the
  // inputs where they do more than repeat read_idx's checks.
  if (array.type == xax::IdxType::uint8 && array.shape.size() == 3) {
    const Eigen::MatrixXf images = xax::read_idx_images(scratch_file());
    if (static_cast<std::size_t>(images.size()) != array.element_count()) std::abort();
    for (Eigen::Index i = 0; i < images.size(); ++i) {
      if (!(images.data()[i] >= 0.0f && images.data()[i] <= 1.0f)) std::abort();
    }
  }
  if (array.type == xax::IdxType::uint8 && array.shape.size() == 1) {
    try {
      const Eigen::VectorX<std::int32_t> labels = xax::read_idx_labels(scratch_file(), 10);
      for (Eigen::Index i = 0; i < labels.size(); ++i) {
        if (labels[i] < 0 || labels[i] >= 10) std::abort();
      }
    } catch (const xax::DataError&) {
      // A label of 10 or more.
    }
  }
  return 0;
}
