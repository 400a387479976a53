#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <array>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <limits>
#include <map>
#include <new>
#include <string>
#include <vector>
#include <xax/task/checkpoint.hpp>
#include <xax/utils/tree_cast.hpp>

#include "checkpoint_bytes.hpp"
#include "scratch_directory.hpp"

// No request this large is legitimate in these tests; one can only come from a size read out of a crafted
// file before it was checked against the file's length. Refusing it turns such a read into a test failure (a
// std::bad_alloc where a CheckpointError is expected) rather than a 4 GiB allocation. Not inlined: GCC would
// take the free() for a mismatch with the malloc() it sees at the call site.
[[gnu::noinline]] void* operator new(std::size_t size) {
  if (size <= (std::size_t{1} << 30)) {
    if (void* memory = std::malloc(size == 0 ? 1 : size)) return memory;
  }
  throw std::bad_alloc();
}
[[gnu::noinline]] void operator delete(void* memory) noexcept {
  std::free(memory);
}
[[gnu::noinline]] void operator delete(void* memory, std::size_t) noexcept {
  std::free(memory);
}

namespace {

using ::testing::HasSubstr;

template <class T>
struct Layer {
  Eigen::Matrix<T, Eigen::Dynamic, Eigen::Dynamic> w;
  Eigen::Matrix<T, Eigen::Dynamic, 1> b;
  XAX_FIELDS(w, b);
};

template <class T>
struct Model {
  std::vector<Layer<T>> layers;
  Eigen::Tensor<T, 3> conv;
  Eigen::Matrix<T, 2, 2> fixed;
  std::map<std::string, T> scalars;
  std::int64_t step = 0;
  XAX_FIELDS(layers, conv, fixed, scalars, step);
};

template <class T>
Model<T> make_model() {
  Model<T> m;
  m.layers.resize(2);
  m.layers[0] = {Eigen::MatrixXf::Random(3, 4).cast<T>(), Eigen::VectorXf::Random(3).cast<T>()};
  m.layers[1] = {Eigen::MatrixXf::Random(2, 3).cast<T>(), Eigen::VectorXf::Random(2).cast<T>()};
  m.conv.resize(2, 1, 3);
  m.conv.setConstant(T(0.25f));
  m.fixed << T(1.0f), T(2.0f), T(3.0f), T(4.0f);
  m.scalars = {{"lr", T(0.5f)}, {"momentum", T(0.875f)}};
  m.step = 42;
  return m;
}

// An empty model of the same structure, as a resumed run has before loading.
template <class T>
Model<T> empty_like() {
  Model<T> m;
  m.layers.resize(2);
  m.scalars = {{"lr", T(0)}, {"momentum", T(0)}};
  return m;
}

class CheckpointTest : public ::testing::Test {
 protected:
  xax_test::ScratchDirectory scratch_{"xax_checkpoint_test"};
  const std::filesystem::path& dir_ = scratch_.path();
};

template <class T>
class CheckpointRoundTrip : public CheckpointTest {};
using Scalars = ::testing::Types<float, xax::bfloat16, xax::float16, double>;
TYPED_TEST_SUITE(CheckpointRoundTrip, Scalars);

TYPED_TEST(CheckpointRoundTrip, RestoresEveryLeafBitForBit) {
  const Model<TypeParam> saved = make_model<TypeParam>();
  xax::CheckpointWriter writer;
  writer.add_tree("model", saved);
  writer.add_string("note", std::string("binary\0safe", 11));
  writer.write(this->dir_ / "a.xax");

  const xax::CheckpointReader reader(this->dir_ / "a.xax");
  Model<TypeParam> loaded = empty_like<TypeParam>();
  reader.read_tree("model", loaded, xax::LeafShapes::from_checkpoint);
  EXPECT_EQ(xax::tree_cast<double>(loaded).layers[1].w, xax::tree_cast<double>(saved).layers[1].w);
  xax::for_each_leaf(
      []<class L>(const L& a, const L& b) {
        const auto x = xax::leaf_span(a);
        const auto y = xax::leaf_span(b);
        ASSERT_EQ(x.size_bytes(), y.size_bytes());
        EXPECT_EQ(std::memcmp(x.data(), y.data(), x.size_bytes()), 0);
      },
      loaded, saved);
  EXPECT_EQ(reader.read_string("note"), std::string("binary\0safe", 11));
  EXPECT_TRUE(reader.contains("model.layers[1].w"));
  EXPECT_TRUE(reader.contains("model.scalars[\"lr\"]"));
}

TEST_F(CheckpointTest, RejectsAnotherDtypeShapeOrStructureNamingTheEntry) {
  xax::CheckpointWriter writer;
  writer.add_tree("model", make_model<float>());
  writer.write(dir_ / "a.xax");
  const xax::CheckpointReader reader(dir_ / "a.xax");
  constexpr auto from_checkpoint = xax::LeafShapes::from_checkpoint;

  Model<double> wrong_dtype = empty_like<double>();
  EXPECT_THAT([&] { reader.read_tree("model", wrong_dtype, from_checkpoint); },
              ::testing::ThrowsMessage<xax::CheckpointError>(HasSubstr("'model.layers[0].w' holds float32")));

  Model<float> more_layers = empty_like<float>();
  more_layers.layers.resize(3);
  EXPECT_THAT([&] { reader.read_tree("model", more_layers, from_checkpoint); },
              ::testing::ThrowsMessage<xax::CheckpointError>(HasSubstr("no entry 'model.layers[2].w'")));

  Model<float> fewer_layers = empty_like<float>();
  fewer_layers.layers.resize(1);
  EXPECT_THAT([&] { reader.read_tree("model", fewer_layers, from_checkpoint); },
              ::testing::ThrowsMessage<xax::CheckpointError>(HasSubstr("another model structure")));

  Eigen::Matrix3f fixed;
  EXPECT_THAT([&] { reader.read_tree("model.fixed", fixed, from_checkpoint); },
              ::testing::ThrowsMessage<xax::CheckpointError>(HasSubstr(
                  "'model.fixed' has shape 2x2 but the live leaf has 3x3, a size the tree's fixed-size "
                  "leaf cannot take")));
  Eigen::Matrix<float, 2, Eigen::Dynamic> fixed_rows(2, 5);
  EXPECT_NO_THROW(reader.read_tree("model.fixed", fixed_rows, from_checkpoint)) << "dynamic columns resize";
  EXPECT_EQ(fixed_rows.cols(), 2);
  Eigen::Matrix<float, 3, Eigen::Dynamic> wrong_rows(3, 2);
  EXPECT_THROW(reader.read_tree("model.fixed", wrong_rows, from_checkpoint), xax::CheckpointError);

  EXPECT_THROW((void)reader.read_string("absent"), xax::CheckpointError);
  EXPECT_THROW((void)reader.read_string("model.step"), xax::CheckpointError) << "a tensor is not a string";
}

// Regression: read_tree resized dynamic leaves to whatever the file held, so a checkpoint of a narrower model
// loaded into a wider one. By default every leaf, dynamic or not, must have the stored shape, the message
// names the leaf and both shapes, and a refused read changes no leaf, not even those before the mismatch.
TEST_F(CheckpointTest, ExactShapesAreRequiredOfDynamicLeavesAndARefusedReadChangesNothing) {
  const Model<float> saved = make_model<float>();
  xax::CheckpointWriter writer;
  writer.add_tree("model", saved);
  writer.write(dir_ / "a.xax");
  const xax::CheckpointReader reader(dir_ / "a.xax");

  Model<float> same_shape = make_model<float>();
  same_shape.layers[0].w.setZero();
  EXPECT_NO_THROW(reader.read_tree("model", same_shape));
  EXPECT_EQ(same_shape.layers[0].w, saved.layers[0].w);

  const auto expect_refused = [&](Model<float> live, const std::string& message) {
    const Model<float> before = live;
    EXPECT_THAT([&] { reader.read_tree("model", live); },
                ::testing::ThrowsMessage<xax::CheckpointError>(HasSubstr(message)));
    xax::for_each_leaf(
        []<class L>(const L& a, const L& b) {
          const auto x = xax::leaf_span(a);
          const auto y = xax::leaf_span(b);
          ASSERT_EQ(x.size_bytes(), y.size_bytes());
          if (x.size_bytes() != 0) {
            EXPECT_EQ(std::memcmp(x.data(), y.data(), x.size_bytes()), 0);
          }
        },
        live, before);
  };
  Model<float> wider = make_model<float>();
  wider.layers[0].w.setConstant(7.0f);  // checked unchanged: it precedes the mismatch
  wider.layers[1].w.resize(2, 8);
  wider.layers[1].w.setConstant(9.0f);
  expect_refused(wider, "entry 'model.layers[1].w' has shape 2x3 but the live leaf has 2x8");

  Model<float> longer_tensor = make_model<float>();
  longer_tensor.layers[0].w.setConstant(5.0f);
  longer_tensor.conv.resize(2, 1, 4);  // a dynamic-size tensor
  longer_tensor.conv.setConstant(3.0f);
  expect_refused(longer_tensor, "entry 'model.conv' has shape 2x1x3 but the live leaf has 2x1x4");

  Model<float> unsized = empty_like<float>();
  expect_refused(unsized, "read it with LeafShapes::from_checkpoint");
}

TEST_F(CheckpointTest, AFixedSizeTensorMustMatchItsShapeNotJustItsByteCount) {
  Eigen::TensorFixedSize<float, Eigen::Sizes<2, 3>> saved;
  saved.setConstant(1.5f);
  xax::CheckpointWriter writer;
  writer.add_tree("t", saved);
  writer.write(dir_ / "t.xax");
  const xax::CheckpointReader reader(dir_ / "t.xax");
  Eigen::TensorFixedSize<float, Eigen::Sizes<3, 2>> transposed;  // the same 24 bytes
  transposed.setZero();
  for (const auto shapes : {xax::LeafShapes::exact, xax::LeafShapes::from_checkpoint}) {
    EXPECT_THAT(
        [&] { reader.read_tree("t", transposed, shapes); },
        ::testing::ThrowsMessage<xax::CheckpointError>(HasSubstr("has shape 2x3 but the live leaf has 3x2")));
  }
  EXPECT_EQ(transposed(0, 0), 0.0f);
}

TEST_F(CheckpointTest, DuplicateEntryNamesAreRefused) {
  xax::CheckpointWriter writer;
  writer.add_tree("a", 1.0f);
  EXPECT_THROW(writer.add_tree("a", 2.0f), xax::CheckpointError);
}

TEST_F(CheckpointTest, EveryTruncationAndEveryFlippedByteIsRefused) {
  xax::CheckpointWriter writer;
  writer.add_tree("model", make_model<float>());
  const std::string bytes = writer.bytes();
  const auto path = dir_ / "c.xax";
  const auto write_raw = [&](const std::string& data) {
    std::ofstream(path, std::ios::binary | std::ios::trunc)
        .write(data.data(), static_cast<std::streamsize>(data.size()));
  };
  for (std::size_t size = 0; size < bytes.size(); size += 7) {
    write_raw(bytes.substr(0, size));
    EXPECT_THROW(xax::CheckpointReader{path}, xax::CheckpointError) << "truncated to " << size;
  }
  for (std::size_t at = 0; at < bytes.size(); at += 5) {
    std::string corrupt = bytes;
    corrupt[at] = static_cast<char>(corrupt[at] ^ 0x20);
    write_raw(corrupt);
    EXPECT_THROW(xax::CheckpointReader{path}, xax::CheckpointError) << "byte " << at << " flipped";
  }
  write_raw(bytes);
  EXPECT_NO_THROW(xax::CheckpointReader{path});
}

TEST_F(CheckpointTest, MessagesSayWhatIsWrong) {
  const auto path = dir_ / "m.xax";
  EXPECT_THAT([&] { xax::CheckpointReader{path}; },
              ::testing::ThrowsMessage<xax::CheckpointError>(HasSubstr("cannot open checkpoint")));
  std::ofstream(path, std::ios::binary) << "this is not a checkpoint at all, just some text";
  EXPECT_THAT([&] { xax::CheckpointReader{path}; },
              ::testing::ThrowsMessage<xax::CheckpointError>(HasSubstr("is not an xax checkpoint")));
  xax::CheckpointWriter writer;
  writer.add_string("x", "y");
  std::string bytes = writer.bytes();
  bytes[bytes.size() - 1] = static_cast<char>(bytes[bytes.size() - 1] ^ 1);
  std::ofstream(path, std::ios::binary | std::ios::trunc) << bytes;
  EXPECT_THAT([&] { xax::CheckpointReader{path}; },
              ::testing::ThrowsMessage<xax::CheckpointError>(HasSubstr("fails its checksum")));
}

TEST_F(CheckpointTest, AFailedWriteLeavesThePreviousCheckpointIntact) {
  const auto path = dir_ / "keep.xax";
  xax::CheckpointWriter first;
  first.add_string("generation", "1");
  first.write(path);

  // The temporary file cannot be created where a directory of that name stands.
  std::filesystem::create_directories(dir_ / "keep.xax.tmp");
  xax::CheckpointWriter second;
  second.add_string("generation", "2");
  EXPECT_THAT([&] { second.write(path); }, ::testing::ThrowsMessage<xax::CheckpointError>(
                                               HasSubstr("previous checkpoint, if any, is unchanged")));
  EXPECT_EQ(xax::CheckpointReader(path).read_string("generation"), "1");

  std::filesystem::remove_all(dir_ / "keep.xax.tmp");
  second.write(path);
  EXPECT_EQ(xax::CheckpointReader(path).read_string("generation"), "2");
  EXPECT_FALSE(std::filesystem::exists(dir_ / "keep.xax.tmp")) << "no temporary file is left behind";
}

TEST_F(CheckpointTest, WritingIntoAMissingDirectoryThrows) {
  xax::CheckpointWriter writer;
  writer.add_string("a", "b");
  EXPECT_THROW(writer.write(dir_ / "no" / "such" / "dir" / "x.xax"), xax::CheckpointError);
}

// ----- Crafted files. Each carries a valid checksum, so the parser's own checks are what refuses it. -----

using xax_test::checkpoint_header;
using xax_test::checkpoint_of;
using xax_test::RawEntry;
using xax_test::with_crc;

xax::CheckpointError parse_error(const std::string& file) {
  try {
    (void)xax::CheckpointReader::from_bytes(file, "crafted");
  } catch (const xax::CheckpointError& error) {
    return error;
  }
  ADD_FAILURE() << "the crafted checkpoint was accepted";
  return xax::CheckpointError("accepted");
}

std::string float_payload(std::size_t count) {
  return std::string(count * sizeof(float), '\x01');
}

// Regression: fields were bounded by the file size, checksum included, so an entry ending inside the checksum
// left the read position past the data's end and the payload copy ran off the buffer (SEGV in memmove).
TEST(CheckpointCrafted, AnEntryRunningIntoTheChecksumIsRefused) {
  RawEntry entry{"x", 0, 2, {}, float_payload(1)};
  const std::string full = entry.bytes();
  // Cut the entry at every byte: each prefix is followed only by the checksum.
  for (std::size_t cut = 0; cut < full.size(); ++cut) {
    const std::string file = with_crc(checkpoint_header(1) + full.substr(0, cut));
    EXPECT_THAT(parse_error(file).what(), HasSubstr("runs past the end of the data")) << "cut at " << cut;
  }
  // The file that crashed the reader: a payload size whose last byte is the checksum's first, so that reading
  // it moved past the data's end, `end - offset` wrapped, and the 1 MiB "payload" was copied from beyond the
  // buffer. The name is varied until the checksum's first byte is 0, which makes the size exactly 1 MiB.
  bool found = false;
  for (int attempt = 0; attempt < 100000 && !found; ++attempt) {
    std::string body = checkpoint_header(1);
    std::string name(1, 'x');
    name.append(std::to_string(attempt));
    xax::detail::append_pod(body, static_cast<std::uint32_t>(name.size()));
    body += name;
    body += std::string{'\0', '\2', '\0'};                             // tensor, float32, rank 0
    body += xax_test::pod_bytes(std::uint64_t{1} << 20).substr(0, 7);  // the size's high byte is the CRC's
    const std::string file = with_crc(body);
    if (file[body.size()] != '\0') continue;
    found = true;
    EXPECT_THAT(parse_error(file).what(), HasSubstr("the payload size of entry 0 '" + name + "'"));
  }
  EXPECT_TRUE(found);
  // The entry count itself may not reach into the checksum either.
  EXPECT_THAT(parse_error(with_crc(checkpoint_header(0).substr(0, 20))).what(),
              HasSubstr("truncated or empty"));
  // A payload size that would wrap the old bound arithmetic.
  std::string huge = checkpoint_header(1);
  huge += RawEntry{"x", 0, 2, {}, ""}.bytes().substr(0, 4 + 1 + 3);
  xax::detail::append_pod(huge, std::numeric_limits<std::uint64_t>::max());
  EXPECT_THAT(parse_error(with_crc(huge)).what(), HasSubstr("the payload of entry 0 'x'"));
}

// Regression (found by checkpoint_fuzzer): an entry's name was allocated at its stored length, up to 4 GiB,
// before the length was checked against the bytes that are left.
TEST(CheckpointCrafted, ANameLongerThanTheFileIsRefusedBeforeItIsAllocated) {
  std::string file = checkpoint_header(1);
  xax::detail::append_pod(file, std::uint32_t{0xFF000000u});
  file += "short";
  EXPECT_THAT(parse_error(with_crc(file)).what(),
              HasSubstr("the name of entry 0 (4278190080 bytes at offset 28) runs past the end of the data"));
}

// Regression: dimensions were not checked, so negative sizes and overflowing products reached resize().
TEST(CheckpointCrafted, DimensionsAreCheckedAgainstThePayload) {
  EXPECT_THAT(parse_error(checkpoint_of({{"w", 0, 2, {-1, 4}, ""}})).what(),
              HasSubstr("entry 0 'w' has dimension 0 = -1; dimensions are >= 0"));
  EXPECT_THAT(
      parse_error(checkpoint_of({{"w", 0, 2, {std::int64_t{1} << 32, std::int64_t{1} << 32}, ""}})).what(),
      HasSubstr("whose element count overflows a 64-bit integer"));
  EXPECT_THAT(
      parse_error(checkpoint_of({{"w", 0, 2, {std::int64_t{1} << 40, 0, std::int64_t{1} << 40}, ""}})).what(),
      HasSubstr("overflows"))
      << "no order of multiplying the dimensions may overflow";
  EXPECT_THAT(
      parse_error(checkpoint_of({{"w", 0, 2, {2, 2}, float_payload(1)}})).what(),
      HasSubstr("entry 0 'w' has shape 2x2 of float32, which takes 16 bytes, but its payload holds 4"));
  EXPECT_THAT(parse_error(checkpoint_of({{"w", 0, 2, {std::int64_t{1} << 62}, float_payload(1)}})).what(),
              HasSubstr("more than 2^64 bytes"));
  EXPECT_THAT(parse_error(checkpoint_of({{"w", 0, 2, {}, float_payload(2)}})).what(),
              HasSubstr("has shape scalar of float32, which takes 4 bytes"));
  // Zero-size leaves are fine.
  const auto reader = xax::CheckpointReader::from_bytes(checkpoint_of({{"w", 0, 2, {0, 3}, ""}}));
  Eigen::MatrixXf w;
  reader.read_tree("w", w, xax::LeafShapes::from_checkpoint);
  EXPECT_EQ(w.rows(), 0);
  EXPECT_EQ(w.cols(), 3);
}

TEST(CheckpointCrafted, ElementCodesKindsStringsAndDuplicatesAreChecked) {
  EXPECT_THAT(parse_error(checkpoint_of({{"w", 0, 7, {1}, "x"}})).what(),
              HasSubstr("entry 0 'w' has unknown element code 7"));
  EXPECT_THAT(parse_error(checkpoint_of({{"w", 0, 41, {1}, "x"}})).what(),
              HasSubstr("unknown element code 41"));
  EXPECT_THAT(parse_error(checkpoint_of({{"w", 2, 0, {}, ""}})).what(),
              HasSubstr("entry 0 'w' has kind 2; known kinds are 0 (tensor) and 1 (string)"));
  EXPECT_THAT(parse_error(checkpoint_of({{"s", 1, 0, {3}, "abc"}})).what(),
              HasSubstr("entry 0 's' is a string but has element code 0 and rank 1"));
  EXPECT_THAT(parse_error(checkpoint_of({{"s", 1, 0, {}, "a"}, {"s", 1, 0, {}, "b"}})).what(),
              HasSubstr("holds entry 's' twice"));
  std::string trailing = checkpoint_header(0) + "xyz";
  EXPECT_THAT(parse_error(with_crc(trailing)).what(), HasSubstr("3 unexpected trailing bytes"));
  // Every integer width and bool is accepted.
  for (const int code_value : {16, 33, 34, 36, 40, 49, 50, 52, 56}) {
    const auto code = static_cast<std::uint8_t>(code_value);
    const std::size_t width = xax::detail::element_size(code);
    EXPECT_NO_THROW((void)xax::CheckpointReader::from_bytes(
        checkpoint_of({{"i", 0, code, {2}, std::string(2 * width, '\0')}})))
        << code_value;
  }
}

TEST(CheckpointCrafted, AnotherFormatVersionIsRefusedByName) {
  EXPECT_THAT(parse_error(with_crc(checkpoint_header(0, 2))).what(),
              HasSubstr("has format version 2; this xax reads version 1"));
}

// Regression: the reader demanded 32 bytes, but a checkpoint with no entries has 28, so it refused what the
// writer wrote.
TEST_F(CheckpointTest, ACheckpointWithNoEntriesRoundTrips) {
  xax::CheckpointWriter().write(dir_ / "empty.xax");
  const xax::CheckpointReader reader(dir_ / "empty.xax");
  EXPECT_FALSE(reader.contains("anything"));
  std::vector<float> none;
  EXPECT_NO_THROW(reader.read_tree("model", none)) << "an empty tree has nothing to read";
}

// Regression: a directory or an empty path gave std::length_error or std::bad_alloc.
TEST_F(CheckpointTest, ADirectoryOrAnEmptyPathIsACheckpointError) {
  EXPECT_THAT([&] { xax::CheckpointReader{dir_}; }, ::testing::ThrowsMessage<xax::CheckpointError>(
                                                        HasSubstr("is a directory, not a checkpoint file")));
  EXPECT_THAT([&] { xax::CheckpointReader{""}; },
              ::testing::ThrowsMessage<xax::CheckpointError>(HasSubstr("the path is empty")));
  EXPECT_THAT([&] { xax::CheckpointReader{"/dev/null"}; },
              ::testing::ThrowsMessage<xax::CheckpointError>(HasSubstr("is not a regular file")));
}

TEST_F(CheckpointTest, AFailedFirstWriteLeavesNoCheckpointAndTouchesNothingElse) {
  const auto path = dir_ / "first.xax";
  // The temporary file cannot be created where a directory of that name stands; the directory is the user's.
  std::filesystem::create_directories(dir_ / "first.xax.tmp");
  xax::CheckpointWriter writer;
  writer.add_string("generation", "1");
  EXPECT_THAT([&] { writer.write(path); },
              ::testing::ThrowsMessage<xax::CheckpointError>(HasSubstr("cannot write checkpoint")));
  EXPECT_FALSE(std::filesystem::exists(path)) << "no checkpoint appears, not even a partial one";
  EXPECT_TRUE(std::filesystem::is_directory(dir_ / "first.xax.tmp")) << "what was not ours stays";
  EXPECT_THAT([&] { xax::CheckpointReader{path}; },
              ::testing::ThrowsMessage<xax::CheckpointError>(HasSubstr("cannot open checkpoint")));

  // A rename over a directory fails after the temporary file was written: it is removed again.
  std::filesystem::remove(dir_ / "first.xax.tmp");
  std::filesystem::create_directories(path / "occupied");
  EXPECT_THROW(writer.write(path), xax::CheckpointError);
  EXPECT_FALSE(std::filesystem::exists(dir_ / "first.xax.tmp")) << "the temporary file is removed";
  EXPECT_TRUE(std::filesystem::exists(path / "occupied"));
}

}  // namespace
