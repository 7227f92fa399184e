// The rate of int8 dot-product instructions (AVX512-VNNI vpdpbusd, 64 multiply-adds each) on one core: 8
// independent accumulators, the signed operand from a register or from a 4 KB buffer in L1. The ceiling of a
// compute-bound step of the linear kernels (a server's batch, a prompt). Prints "register memory" in
// instructions per ns, one line per repetition. Built and run by dot_rate.py: cc -O2 -march=native dot_rate.c.

#include <immintrin.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

static double now(void) {
  struct timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return t.tv_sec + t.tv_nsec * 1e-9;
}

int main(int argc, char** argv) {
#if defined(__AVX512VNNI__)
  const long count = 200000000;  // instructions per measurement
  const int repeats = atoi(argv[1]);
  static int8_t buffer[4096] __attribute__((aligned(64)));
  for (int i = 0; i < 4096; ++i) buffer[i] = (int8_t)(i % 7);
  const __m512i unsigned_levels = _mm512_set1_epi8(3);
  for (int repeat = 0; repeat < repeats; ++repeat) {
    __m512i acc[8];
    for (int i = 0; i < 8; ++i) acc[i] = _mm512_set1_epi32(i);
    __m512i levels = _mm512_set1_epi8(1);
    double start = now();
    for (long n = 0; n < count; n += 8) {
      for (int i = 0; i < 8; ++i) acc[i] = _mm512_dpbusd_epi32(acc[i], unsigned_levels, levels);
      __asm__ volatile("" : "+v"(levels));  // keeps the operand a register the compiler cannot fold
    }
    const double in_registers = count / (now() - start) / 1e9;
    start = now();
    for (long n = 0; n < count; n += 8) {
      for (int i = 0; i < 8; ++i) {
        acc[i] = _mm512_dpbusd_epi32(acc[i], unsigned_levels, _mm512_load_si512(buffer + 64 * ((n / 8 + i) & 63)));
      }
      __asm__ volatile("" ::: "memory");
    }
    const double from_memory = count / (now() - start) / 1e9;
    __m512i sum = acc[0];
    for (int i = 1; i < 8; ++i) sum = _mm512_add_epi32(sum, acc[i]);
    printf("%.3f %.3f %d\n", in_registers, from_memory, _mm512_reduce_add_epi32(sum) & 1);
  }
  return 0;
#else
  (void)argc;
  (void)argv;
  fprintf(stderr, "no AVX512-VNNI on this CPU\n");
  return 1;
#endif
}
