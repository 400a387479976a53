# Test and benchmark dependencies: the system package first (Debian: libgtest-dev, libbenchmark-dev), a pinned
# download only when it is missing.
include(FetchContent)

if(XAX_BUILD_TESTS)
  FetchContent_Declare(
    googletest
    URL https://github.com/google/googletest/archive/refs/tags/release-1.12.1.tar.gz
    URL_HASH SHA256=81964fe578e9bd7c94dfdb09c8e4d6e6759e19967e397dbea48d1c10e45d0df2
    FIND_PACKAGE_ARGS 1.11 NAMES GTest)
  set(INSTALL_GTEST OFF CACHE BOOL "" FORCE)
  FetchContent_MakeAvailable(googletest)
  include(GoogleTest)
endif()

if(XAX_BUILD_BENCHMARKS OR XAX_BUILD_TESTS)
  FetchContent_Declare(
    benchmark
    URL https://github.com/google/benchmark/archive/refs/tags/v1.7.1.tar.gz
    URL_HASH SHA256=6430e4092653380d9dc4ccb45a1e2dc9259d581f4866dc0759713126056bc1d7
    FIND_PACKAGE_ARGS 1.6 NAMES benchmark)
  set(BENCHMARK_ENABLE_TESTING OFF CACHE BOOL "" FORCE)
  FetchContent_MakeAvailable(benchmark)
endif()

# Optional, each from a Debian package. Features that need one say so when it is missing.
find_package(CLI11 CONFIG QUIET)
find_package(nlohmann_json 3.10 CONFIG QUIET)
find_program(XAX_GNUPLOT gnuplot)
