// The machine's streaming read bandwidth: threads sum disjoint halves of a buffer far larger than the caches,
// 512 bits (or 256 without AVX-512) per load, 4 independent sums per thread. Prints GB/s of each repetition.
// Built and run by read_bandwidth.py: cc -O2 -march=native -fopenmp read_bandwidth.c.

#include <immintrin.h>
#include <omp.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

int main(int argc, char** argv) {
  const size_t bytes = (size_t)atol(argv[1]) << 20;
  const int repeats = atoi(argv[2]);
  char* buffer = aligned_alloc(64, bytes);
  memset(buffer, 1, bytes);  // touch every page before timing
  for (int repeat = 0; repeat < repeats; ++repeat) {
    const double start = omp_get_wtime();
    int64_t check = 0;
#pragma omp parallel reduction(+ : check)
    {
#if defined(__AVX512F__)
      __m512i a = _mm512_setzero_si512(), b = a, c = a, d = a;
#pragma omp for
      for (size_t i = 0; i < bytes; i += 256) {
        a = _mm512_add_epi64(a, _mm512_load_si512(buffer + i));
        b = _mm512_add_epi64(b, _mm512_load_si512(buffer + i + 64));
        c = _mm512_add_epi64(c, _mm512_load_si512(buffer + i + 128));
        d = _mm512_add_epi64(d, _mm512_load_si512(buffer + i + 192));
      }
      check += _mm512_reduce_add_epi64(_mm512_add_epi64(_mm512_add_epi64(a, b), _mm512_add_epi64(c, d)));
#else
      __m256i a = _mm256_setzero_si256(), b = a, c = a, d = a;
#pragma omp for
      for (size_t i = 0; i < bytes; i += 128) {
        a = _mm256_add_epi64(a, _mm256_load_si256((const __m256i*)(buffer + i)));
        b = _mm256_add_epi64(b, _mm256_load_si256((const __m256i*)(buffer + i + 32)));
        c = _mm256_add_epi64(c, _mm256_load_si256((const __m256i*)(buffer + i + 64)));
        d = _mm256_add_epi64(d, _mm256_load_si256((const __m256i*)(buffer + i + 96)));
      }
      int64_t lanes[4];
      _mm256_storeu_si256((__m256i*)lanes, _mm256_add_epi64(_mm256_add_epi64(a, b), _mm256_add_epi64(c, d)));
      check += lanes[0] + lanes[1] + lanes[2] + lanes[3];
#endif
    }
    const double seconds = omp_get_wtime() - start;
    printf("%.3f %lld\n", bytes / seconds / 1e9, (long long)(check & 1));
  }
  free(buffer);
  return 0;
}
