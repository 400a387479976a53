#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <fcntl.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <chrono>
#include <csignal>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <future>
#include <limits>
#include <map>
#include <new>
#include <span>
#include <stdexcept>
#include <string>
#include <thread>
#include <utility>
#include <vector>
#include <xax/task/checkpoint.hpp>
#include <xax/task/mixins/train.hpp>
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

// The names in `dir`, sorted: what a write left behind.
std::vector<std::string> names_in(const std::filesystem::path& dir) {
  std::vector<std::string> names;
  for (const auto& entry : std::filesystem::directory_iterator(dir)) names.push_back(entry.path().filename());
  std::sort(names.begin(), names.end());
  return names;
}

// While alive, files this process writes cannot grow past `bytes` (write() fails with EFBIG rather than
// raising SIGXFSZ): a disk that fills up, for any user, root included.
class FileSizeLimit {
 public:
  explicit FileSizeLimit(rlim_t bytes) {
    previous_signal_ = std::signal(SIGXFSZ, SIG_IGN);
    ::getrlimit(RLIMIT_FSIZE, &previous_);
    rlimit limit = previous_;
    limit.rlim_cur = bytes;
    ::setrlimit(RLIMIT_FSIZE, &limit);
  }
  ~FileSizeLimit() {
    ::setrlimit(RLIMIT_FSIZE, &previous_);
    std::signal(SIGXFSZ, previous_signal_);
  }
  FileSizeLimit(const FileSizeLimit&) = delete;
  FileSizeLimit& operator=(const FileSizeLimit&) = delete;

 private:
  rlimit previous_{};
  void (*previous_signal_)(int) = nullptr;
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

  // The disk "fills up" halfway through the temporary file.
  xax::CheckpointWriter second;
  second.add_string("generation", "2");
  second.add_tree("big", Eigen::VectorXf::Constant(1 << 16, 2.0f).eval());
  {
    const FileSizeLimit limit(4096);
    EXPECT_THAT([&] { second.write(path); }, ::testing::ThrowsMessage<xax::CheckpointError>(
                                                 HasSubstr("previous checkpoint, if any, is unchanged")));
  }
  EXPECT_EQ(xax::CheckpointReader(path).read_string("generation"), "1");
  EXPECT_EQ(names_in(dir_), std::vector<std::string>{"keep.xax"}) << "the temporary file is removed";

  second.write(path);
  EXPECT_EQ(xax::CheckpointReader(path).read_string("generation"), "2");
  EXPECT_EQ(names_in(dir_), std::vector<std::string>{"keep.xax"}) << "no temporary file is left behind";
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
  EXPECT_THAT(parse_error(with_crc(checkpoint_header(0, 3))).what(),
              HasSubstr("has format version 3; this xax reads versions 1 and 2"));
  EXPECT_THAT(parse_error(with_crc(checkpoint_header(0, 0))).what(), HasSubstr("has format version 0"));
  EXPECT_NO_THROW((void)xax::CheckpointReader::from_bytes(with_crc(checkpoint_header(0, 1))));
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

// Every name a file may have can be written: a name of 243 to 255 bytes left no room for the temporary
// file's suffix, and every write failed with "File name too long". Nothing is left behind either way.
TEST_F(CheckpointTest, ACheckpointWithTheLongestFileNameIsWritten) {
  for (const std::size_t length : {242U, 243U, 250U, 255U}) {
    const std::filesystem::path path = dir_ / (std::string(length - 4, 'c') + ".xax");
    xax::CheckpointWriter writer;
    writer.add_string("note", "long");
    ASSERT_NO_THROW(writer.write(path)) << length;
    ASSERT_NO_THROW(writer.write(path)) << length << ", over the first";
    EXPECT_EQ(xax::CheckpointReader(path).read_string("note"), "long");
    EXPECT_EQ(names_in(dir_), std::vector<std::string>{path.filename()});
    std::filesystem::remove(path);
  }
}

// A checkpoint saved through a symbolic link replaces the file the link names, as writing the path would, and
// the link stays: it was replaced by a regular file, the file it named keeping the old checkpoint.
TEST_F(CheckpointTest, AWriteThroughALinkReplacesTheFileItNamesAndKeepsTheLink) {
  std::filesystem::create_directory(dir_ / "run");
  xax::CheckpointWriter first, second;
  first.add_string("note", "first");
  second.add_string("note", "second");
  first.write(dir_ / "run" / "step_10.xax");
  std::filesystem::create_symlink("run/step_10.xax",
                                  dir_ / "latest.xax");  // relative to the link's directory
  second.write(dir_ / "latest.xax");
  EXPECT_TRUE(std::filesystem::is_symlink(dir_ / "latest.xax"));
  EXPECT_EQ(xax::CheckpointReader(dir_ / "run" / "step_10.xax").read_string("note"), "second");
  EXPECT_EQ(names_in(dir_ / "run"), std::vector<std::string>{"step_10.xax"}) << "no temporary file left";

  // A dangling link names the file a write creates; a loop of links is an error that writes nothing.
  std::filesystem::create_symlink(dir_ / "run" / "step_20.xax", dir_ / "next.xax");
  first.write(dir_ / "next.xax");
  EXPECT_EQ(xax::CheckpointReader(dir_ / "run" / "step_20.xax").read_string("note"), "first");
  std::filesystem::create_symlink("loop_b.xax", dir_ / "loop_a.xax");
  std::filesystem::create_symlink("loop_a.xax", dir_ / "loop_b.xax");
  EXPECT_THAT([&] { first.write(dir_ / "loop_a.xax"); },
              ::testing::ThrowsMessage<xax::CheckpointError>(HasSubstr("symbolic links to follow")));
  EXPECT_TRUE(std::filesystem::is_symlink(dir_ / "loop_a.xax"));
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
  // A directory at the name older versions used for their temporary file is someone else's: it stays.
  std::filesystem::create_directories(dir_ / "first.xax.tmp");
  xax::CheckpointWriter writer;
  writer.add_string("generation", "1");
  writer.add_tree("big", Eigen::VectorXf::Constant(1 << 16, 2.0f).eval());
  {
    const FileSizeLimit limit(4096);
    EXPECT_THAT([&] { writer.write(path); },
                ::testing::ThrowsMessage<xax::CheckpointError>(HasSubstr("cannot write checkpoint")));
  }
  EXPECT_FALSE(std::filesystem::exists(path)) << "no checkpoint appears, not even a partial one";
  EXPECT_EQ(names_in(dir_), std::vector<std::string>{"first.xax.tmp"}) << "what was not ours stays";
  EXPECT_THAT([&] { xax::CheckpointReader{path}; },
              ::testing::ThrowsMessage<xax::CheckpointError>(HasSubstr("cannot open checkpoint")));

  // A rename over a directory fails after the temporary file was written: it is removed again.
  std::filesystem::remove(dir_ / "first.xax.tmp");
  std::filesystem::create_directories(path / "occupied");
  EXPECT_THROW(writer.write(path), xax::CheckpointError);
  EXPECT_EQ(names_in(dir_), std::vector<std::string>{"first.xax"}) << "the temporary file is removed";
  EXPECT_TRUE(std::filesystem::exists(path / "occupied"));
}

// ----- Bool leaves -----

// Regression: a bool payload byte other than 0 or 1 (under a valid checksum) was copied into a bool, whose
// every later use is undefined behaviour. The parser refuses it before any tree sees it.
TEST(CheckpointCrafted, ABoolByteOtherThanZeroOrOneIsRefused) {
  for (const char byte : {'\x02', '\x7f', '\xff'}) {
    EXPECT_THAT(
        parse_error(checkpoint_of({{"flags", 0, 16, {3, 1}, std::string{'\x00', '\x01', byte}}})).what(),
        HasSubstr("entry 0 'flags' holds byte " + std::to_string(static_cast<unsigned char>(byte)) +
                  " at element 2; bool bytes must be 0 or 1"));
  }
  EXPECT_THAT(parse_error(checkpoint_of({{"flag", 0, 16, {}, std::string(1, '\x02')}})).what(),
              HasSubstr("bool bytes must be 0 or 1"));
  const auto reader =
      xax::CheckpointReader::from_bytes(checkpoint_of({{"flag", 0, 16, {}, std::string(1, '\x01')}}));
  bool flag = false;
  reader.read_tree("flag", flag);
  EXPECT_TRUE(flag);
}

// ----- Storage order -----

using RowMatrix = Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
using RowTensor = Eigen::Tensor<float, 3, Eigen::RowMajor>;

template <class Tree>
std::string bytes_of(const Tree& tree) {
  xax::CheckpointWriter writer;
  writer.add_tree("w", tree);
  return writer.bytes();
}

// Regression: entries held each leaf's storage as it was, so a row-major leaf restored into a column-major
// one of the same shape (or the other way round) came back transposed, without an error. Every entry now
// holds its elements in column-major order whatever the leaf's layout, and each leaf is reordered on the way
// in and out.
TEST(CheckpointLayout, RowAndColumnMajorLeavesRestoreEachOtherElementForElement) {
  RowMatrix row(2, 3);
  row << 1, 2, 3, 4, 5, 6;
  const Eigen::MatrixXf column = row;
  EXPECT_EQ(bytes_of(row), bytes_of(column)) << "the file does not depend on the leaf's layout";

  Eigen::MatrixXf into_column(2, 3);
  xax::CheckpointReader::from_bytes(bytes_of(row)).read_tree("w", into_column);
  EXPECT_EQ(into_column, column);
  RowMatrix into_row(2, 3);
  xax::CheckpointReader::from_bytes(bytes_of(column)).read_tree("w", into_row);
  EXPECT_EQ(into_row, row);
  RowMatrix resized;
  xax::CheckpointReader::from_bytes(bytes_of(column))
      .read_tree("w", resized, xax::LeafShapes::from_checkpoint);
  EXPECT_EQ(resized, row);

  RowTensor row_tensor(2, 3, 4);
  Eigen::Tensor<float, 3> column_tensor(2, 3, 4);
  for (int i = 0; i < 2; ++i) {
    for (int j = 0; j < 3; ++j) {
      for (int k = 0; k < 4; ++k) {
        row_tensor(i, j, k) = static_cast<float>(100 * i + 10 * j + k);
        column_tensor(i, j, k) = row_tensor(i, j, k);
      }
    }
  }
  EXPECT_EQ(bytes_of(row_tensor), bytes_of(column_tensor));
  Eigen::Tensor<float, 3> tensor_back(2, 3, 4);
  xax::CheckpointReader::from_bytes(bytes_of(row_tensor)).read_tree("w", tensor_back);
  RowTensor row_tensor_back;
  xax::CheckpointReader::from_bytes(bytes_of(column_tensor))
      .read_tree("w", row_tensor_back, xax::LeafShapes::from_checkpoint);
  for (int i = 0; i < 2; ++i) {
    for (int j = 0; j < 3; ++j) {
      for (int k = 0; k < 4; ++k) {
        EXPECT_EQ(tensor_back(i, j, k), row_tensor(i, j, k));
        EXPECT_EQ(row_tensor_back(i, j, k), row_tensor(i, j, k));
      }
    }
  }
  Eigen::TensorFixedSize<float, Eigen::Sizes<2, 2>, Eigen::RowMajor> fixed_row;
  fixed_row.setValues({{1, 2}, {3, 4}});
  Eigen::Tensor<float, 2> fixed_back(2, 2);
  xax::CheckpointReader::from_bytes(bytes_of(fixed_row)).read_tree("w", fixed_back);
  EXPECT_EQ(fixed_back(0, 1), 2.0f);
  EXPECT_EQ(fixed_back(1, 0), 3.0f);
}

// Format version 1 stored each leaf in its writer's storage order without recording it. Its files load as
// they always did, each leaf taking the bytes in its own order, so a run resumes from the files it wrote.
TEST(CheckpointLayout, VersionOneFilesLoadAsTheyAlwaysDid) {
  RowMatrix row(2, 3);
  row << 1, 2, 3, 4, 5, 6;
  const Eigen::MatrixXf column = row;
  std::string version_one = bytes_of(column);
  const std::uint32_t one = 1;
  std::memcpy(version_one.data() + sizeof(xax::detail::checkpoint_magic) + sizeof(std::uint32_t), &one, 4);
  version_one = with_crc(version_one.substr(0, version_one.size() - 4));
  const auto reader = xax::CheckpointReader::from_bytes(version_one, "old.xax");

  Eigen::MatrixXf into_column(2, 3);
  reader.read_tree("w", into_column);
  EXPECT_EQ(into_column, column);
  // Version 1 held a leaf's own order, so a row-major leaf takes the bytes as they are, as it did then: the
  // program that wrote the file resumes from it.
  RowMatrix into_row = RowMatrix::Zero(2, 3);
  reader.read_tree("w", into_row);
  EXPECT_EQ(into_row, (Eigen::Map<const RowMatrix>(column.data(), 2, 3)));

  // A leaf with at most one dimension above 1 has one order only.
  Eigen::Matrix<float, 1, Eigen::Dynamic, Eigen::RowMajor> row_vector(3);
  row_vector << 1, 2, 3;
  std::string vector_one = bytes_of(row_vector);
  std::memcpy(vector_one.data() + sizeof(xax::detail::checkpoint_magic) + sizeof(std::uint32_t), &one, 4);
  vector_one = with_crc(vector_one.substr(0, vector_one.size() - 4));
  Eigen::Matrix<float, 1, Eigen::Dynamic, Eigen::RowMajor> vector_back(3);
  xax::CheckpointReader::from_bytes(vector_one).read_tree("w", vector_back);
  EXPECT_EQ(vector_back, row_vector);
}

// ----- Compile-time maximum sizes -----

// Regression: with LeafShapes::from_checkpoint, a dynamic dimension with a compile-time maximum (Eigen's
// MaxRows/MaxCols, inline storage) was resized to any stored size, and the copy ran past the inline buffer.
TEST(CheckpointShapes, AStoredSizeAboveALeafsCompileTimeMaximumIsRefused) {
  const Eigen::MatrixXf big = Eigen::MatrixXf::Constant(16, 3, 7.0f);
  const auto reader = xax::CheckpointReader::from_bytes(bytes_of(big));
  Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, 0, 4, 4> small;
  EXPECT_THAT([&] { reader.read_tree("w", small, xax::LeafShapes::from_checkpoint); },
              ::testing::ThrowsMessage<xax::CheckpointError>(
                  HasSubstr("entry 'w' has shape 16x3 but the live leaf has 0x0, more rows than the tree's "
                            "leaf can hold (at most 4, its MaxRowsAtCompileTime)")));
  EXPECT_EQ(small.size(), 0);
  Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, 0, 16, 2> narrow;
  EXPECT_THAT([&] { reader.read_tree("w", narrow, xax::LeafShapes::from_checkpoint); },
              ::testing::ThrowsMessage<xax::CheckpointError>(HasSubstr(
                  "more columns than the tree's leaf can hold (at most 2, its MaxColsAtCompileTime)")));
  Eigen::Matrix<float, Eigen::Dynamic, 3, 0, 16, 3> fits;
  reader.read_tree("w", fits, xax::LeafShapes::from_checkpoint);
  EXPECT_EQ(fits, big);
}

// ----- Trees under one another's prefix -----

// Regression: add_tree("model", m) and add_tree("model.ema", e) were both accepted, but read_tree("model", m)
// counts every tensor under "model." as its own and refused the file the writer had just written. The
// writer now refuses a tree prefix that extends another tree's (with '.' or '['), in either order.
TEST(CheckpointPrefixes, ATreeUnderAnotherTreesPrefixIsRefusedByTheWriter) {
  const Eigen::MatrixXf w = Eigen::MatrixXf::Ones(2, 2);
  for (const auto& prefixes : std::vector<std::pair<std::string, std::string>>{
           {"model", "model.ema"}, {"model.ema", "model"}, {"a", "a[0]"}, {"", "x"}, {"x", ""}}) {
    const std::string& first = prefixes.first;  // not a structured binding: clang 14 cannot capture one
    const std::string& second = prefixes.second;
    xax::CheckpointWriter writer;
    writer.add_tree(first, w);
    EXPECT_THAT(
        [&] { writer.add_tree(second, w); },
        ::testing::ThrowsMessage<xax::CheckpointError>(HasSubstr(
            "would be counted as part of the tree under '" + std::min(first, second) +
            "' when it is read; give each tree a prefix that neither extends another's with '.' or '[' "
            "nor is extended by one (e.g. 'model_ema' beside 'model')")))
        << first << " then " << second;
  }
  xax::CheckpointWriter same;
  same.add_tree("a", w);
  EXPECT_THAT([&] { same.add_tree("a", w); }, ::testing::ThrowsMessage<xax::CheckpointError>(
                                                  HasSubstr("a tree was already added under 'a'")));

  // Siblings, and strings under a tree's prefix (tensors alone are counted), are fine and read back.
  xax::CheckpointWriter writer;
  writer.add_tree("model", w);
  writer.add_tree("model_ema", Eigen::MatrixXf::Constant(2, 2, 2.0f).eval());
  writer.add_tree("modelx", 1.0f);
  writer.add_string("model.note", "a string");
  const auto reader = xax::CheckpointReader::from_bytes(writer.bytes());
  Eigen::MatrixXf model(2, 2), ema(2, 2);
  reader.read_tree("model", model);
  reader.read_tree("model_ema", ema);
  EXPECT_EQ(model, w);
  EXPECT_EQ(ema(1, 1), 2.0f);
}

// Regression: a tree whose later leaf's name was taken (here by a string entry) threw with its prefix
// registered and its earlier leaves added, so a caller that caught the error and wrote anyway saved half a
// tree, and could not add the tree again. Now a failed add_tree leaves the writer as it was.
TEST(CheckpointPrefixes, AFailedAddTreeLeavesTheWriterAsItWas) {
  const std::map<std::string, float> scalars{{"a", 1.0f}, {"b", 2.0f}};
  xax::CheckpointWriter writer;
  writer.add_string("m[\"b\"]", "taken");
  const std::string before = writer.bytes();
  EXPECT_THAT([&] { writer.add_tree("m", scalars); },
              ::testing::ThrowsMessage<xax::CheckpointError>(
                  HasSubstr("checkpoint entry 'm[\"b\"]' was added twice; give each tree its own prefix")));
  EXPECT_EQ(writer.bytes(), before);
  const std::map<std::string, float> other{{"a", 3.0f}};
  EXPECT_NO_THROW(writer.add_tree("m", other));
  std::map<std::string, float> read{{"a", 0.0f}};
  xax::CheckpointReader::from_bytes(writer.bytes()).read_tree("m", read);
  EXPECT_EQ(read.at("a"), 3.0f);
}

// ----- The temporary file -----

// Regression: the temporary file was always "<path>.tmp", opened with O_CREAT|O_TRUNC. A symbolic link there
// was followed (the file it named was overwritten and <path> became the link), a FIFO made write() block
// forever, and an unrelated file there was truncated and renamed away. Each write now creates a file of its
// own beside the target (O_EXCL, never following a link) and leaves every other name alone.
TEST_F(CheckpointTest, WhateverStandsAtTheOldTemporaryNameIsLeftAlone) {
  xax::CheckpointWriter writer;
  writer.add_tree("p", Eigen::VectorXf::Constant(16, 1.0f).eval());

  { std::ofstream(dir_ / "victim.txt") << "precious user data\n"; }
  std::filesystem::create_symlink(dir_ / "victim.txt", dir_ / "link.xax.tmp");
  writer.write(dir_ / "link.xax");
  EXPECT_EQ(xax_test::read_bytes(dir_ / "victim.txt"), "precious user data\n");
  EXPECT_TRUE(std::filesystem::is_regular_file(std::filesystem::symlink_status(dir_ / "link.xax")));
  EXPECT_TRUE(std::filesystem::is_symlink(dir_ / "link.xax.tmp"));

  { std::ofstream(dir_ / "other.xax.tmp") << "someone else's file\n"; }
  writer.write(dir_ / "other.xax");
  EXPECT_EQ(xax_test::read_bytes(dir_ / "other.xax.tmp"), "someone else's file\n");
  EXPECT_NO_THROW(xax::CheckpointReader{dir_ / "other.xax"});

  ASSERT_EQ(::mkfifo((dir_ / "fifo.xax.tmp").c_str(), 0600), 0);
  auto done = std::async(std::launch::async, [&] { writer.write(dir_ / "fifo.xax"); });
  if (done.wait_for(std::chrono::seconds(20)) != std::future_status::ready) {
    ADD_FAILURE() << "write() blocked on the FIFO at fifo.xax.tmp";
    // Open the FIFO's read end so that the blocked write can finish and the test end.
    const int reader = ::open((dir_ / "fifo.xax.tmp").c_str(), O_RDONLY | O_NONBLOCK);
    done.wait();
    ::close(reader);
  }
  EXPECT_NO_THROW(done.get());
  EXPECT_NO_THROW(xax::CheckpointReader{dir_ / "fifo.xax"});
  EXPECT_TRUE(std::filesystem::is_fifo(dir_ / "fifo.xax.tmp"));
  EXPECT_EQ(names_in(dir_), (std::vector<std::string>{"fifo.xax", "fifo.xax.tmp", "link.xax", "link.xax.tmp",
                                                      "other.xax", "other.xax.tmp", "victim.txt"}));
}

// Regression: two writes to one path shared the temporary file, so one could rename it over the path while
// the other was still writing into it, report success, and leave a corrupt file at the path. Each write has
// its own temporary file now, so whichever rename comes last leaves a complete checkpoint.
TEST_F(CheckpointTest, ConcurrentWritesToOnePathEachLeaveACompleteCheckpoint) {
  const auto path = dir_ / "shared.xax";
  std::array<xax::CheckpointWriter, 2> writers;
  for (std::size_t w = 0; w < writers.size(); ++w) {
    writers[w].add_string("writer", std::to_string(w));
    writers[w].add_tree("p", Eigen::VectorXf::Constant(1 << 18, static_cast<float>(w)).eval());
  }
  std::array<std::string, 2> failures;
  const auto run = [&](std::size_t w) {
    try {
      for (int round = 0; round < 20; ++round) {
        writers[w].write(path);
        // Just after this write returned, the file at the path is some writer's complete checkpoint.
        const xax::CheckpointReader reader(path);
        const std::string who = reader.read_string("writer");
        if (who != "0" && who != "1") throw std::runtime_error("unknown writer " + who);
      }
    } catch (const std::exception& error) {
      failures[w] = error.what();
    }
  };
  std::thread other(run, 1);
  run(0);
  other.join();
  EXPECT_EQ(failures[0], "");
  EXPECT_EQ(failures[1], "");
  EXPECT_EQ(names_in(dir_), std::vector<std::string>{"shared.xax"});
}

// Regression: the new file was created 0644 whatever the old one's mode, so a checkpoint made private
// (chmod 600) became readable by everyone at the next save. A replaced checkpoint keeps its mode; a new one
// gets the default 0666 less the umask.
TEST_F(CheckpointTest, AReplacedCheckpointKeepsItsModeAndANewOneFollowsTheUmask) {
  const auto mode_of = [](const std::filesystem::path& p) {
    struct stat s {};
    EXPECT_EQ(::stat(p.c_str(), &s), 0);
    return s.st_mode & 07777;
  };
  xax::CheckpointWriter writer;
  writer.add_string("x", "y");
  const mode_t previous_umask = ::umask(027);
  writer.write(dir_ / "new.xax");
  EXPECT_EQ(mode_of(dir_ / "new.xax"), 0640u);
  ::umask(0);
  writer.write(dir_ / "open.xax");
  EXPECT_EQ(mode_of(dir_ / "open.xax"), 0666u);
  ::umask(previous_umask);

  for (const mode_t mode : {0600u, 0644u, 0400u}) {
    ASSERT_EQ(::chmod((dir_ / "new.xax").c_str(), mode), 0);
    writer.write(dir_ / "new.xax");
    EXPECT_EQ(mode_of(dir_ / "new.xax"), mode);
  }
}

TEST_F(CheckpointTest, APathWithoutAFileNameIsRefused) {
  xax::CheckpointWriter writer;
  writer.add_string("x", "y");
  EXPECT_THAT([&] { writer.write(""); },
              ::testing::ThrowsMessage<xax::CheckpointError>(HasSubstr("the path is empty")));
  EXPECT_THAT([&] { writer.write(dir_ / ""); },
              ::testing::ThrowsMessage<xax::CheckpointError>(HasSubstr("names a directory, not a file")));
  EXPECT_TRUE(names_in(dir_).empty());
}

// ----- The loop position of TrainMixin -----

// A task with a trivial step: what is tested is the loop position load_checkpoint accepts and fit() uses.
class LoopTask : public xax::TrainMixin<LoopTask, xax::TrainConfig> {
 public:
  using batch_type = int;
  explicit LoopTask(xax::TrainConfig config) : TrainMixin(std::move(config)) { set_log_stream(nullptr); }
  [[nodiscard]] std::int64_t num_examples() const { return examples; }
  std::int64_t examples = 16;
  [[nodiscard]] int make_batch(std::span<const std::int64_t>) const { return 0; }
  xax::StepResult train_step(std::vector<int>) { return {}; }
  void save_train_state(xax::CheckpointWriter&) const {}
  void load_train_state(const xax::CheckpointReader&) {}
};

xax::TrainConfig loop_config() {
  xax::TrainConfig config;
  config.batch_size = 4;  // 4 batches per epoch
  config.epochs = 2;
  config.progress = false;
  return config;
}

// Regression: load_checkpoint required only that the loop position be >= 0, so a crafted 'loop' entry with a
// batch in epoch or a step count near INT64_MAX was accepted and fit() overflowed signed integers. The batch
// in epoch is now at most the batches of an epoch, and the step count leaves room for the next step.
TEST_F(CheckpointTest, ALoopPositionNoRunCanReachIsRefused) {
  const auto path = dir_ / "loop.xax";
  const auto load_with = [&](std::size_t index, std::int64_t value) {
    LoopTask written(loop_config());
    written.save_checkpoint(path);
    xax_test::edit_checkpoint(path, [&](std::vector<RawEntry>& entries) {
      xax_test::entry_named(entries, "loop[" + std::to_string(index) + "]").payload =
          xax_test::pod_bytes(value);
    });
    LoopTask live(loop_config());
    live.load_checkpoint(path);
    return live;
  };
  constexpr std::int64_t max = std::numeric_limits<std::int64_t>::max();
  for (const std::int64_t batch : {std::int64_t{5}, max - 1, max}) {
    EXPECT_THAT(
        [&] { (void)load_with(2, batch); },
        ::testing::ThrowsMessage<xax::CheckpointError>(HasSubstr(
            "batch in epoch " + std::to_string(batch) +
            ", but an epoch of the task's 16 examples has 4 "
            "batches of batch_size 4; expected at most 4 (the checkpoint was written for another data "
            "set or batch_size)")));
  }
  EXPECT_THAT([&] { (void)load_with(0, max); },
              ::testing::ThrowsMessage<xax::CheckpointError>(HasSubstr(
                  "step " + std::to_string(max) + ", epoch 0, batch in epoch 0; expected a step < " +
                  std::to_string(max) + ", so that the next step can be counted")));

  LoopTask end_of_epoch = load_with(2, 4);  // a checkpoint written after an epoch's last step
  EXPECT_EQ(end_of_epoch.fit().steps, 4) << "the second epoch";
  // A position past the epoch fit() runs (the data shrank since the load) ends that epoch.
  LoopTask shrunk = load_with(2, 3);
  shrunk.examples = 8;
  EXPECT_EQ(shrunk.fit().steps, 2) << "the second epoch, of 2 batches";
  // The largest step count a checkpoint may hold is accepted, and fit() refuses the step that would pass it
  // rather than overflow.
  LoopTask last = load_with(0, max - 1);
  EXPECT_THAT([&] { (void)last.fit(); },
              ::testing::ThrowsMessage<xax::Error>(HasSubstr("the step count " + std::to_string(max - 1))));
  EXPECT_EQ(last.fit_steps(), max - 1);
}

}  // namespace
