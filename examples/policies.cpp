// Prints what this CPU offers for half precision and how a few policy strings parse.
//   ./build/release/examples/policies "params=float32,compute=bfloat16"
#include <xax/xax.hpp>

#include <cstdio>
#include <exception>

int main(int argc, char** argv) {
  std::printf("cpu: %s\nhalf_dtype(): %s\n", xax::cpu_features().str().c_str(),
              std::string(xax::dtype_name(xax::half_dtype())).c_str());
  const char* defaults[] = {"default", "mixed", "float16", "c=bf16"};
  for (int i = 1; i < (argc > 1 ? argc : 5); ++i) {
    const char* text = argc > 1 ? argv[i] : defaults[i - 1];
    try {
      std::printf("%-20s -> %s\n", text, xax::get_policy(text).str().c_str());
    } catch (const xax::Error& error) {
      std::printf("%-20s -> error: %s\n", text, error.what());
      return 1;
    }
  }
  return 0;
}
