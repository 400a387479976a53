// expected-error: error: .*xax must not be compiled with -ffast-math, -ffinite-math-only or /fp:fast
// A -ffast-math translation unit (the compiler then defines __FAST_MATH__, simulated here) would let the
// optimiser delete every finiteness check behind dynamic loss scaling; xax refuses to compile in it.
#define __FAST_MATH__ 1
#include <xax/utils/finite.hpp>

int main() {
  return 0;
}
