/* int8 and int4 weights x int8 activations on AVX2 CPUs, for decode steps and short prefills.
 *
 * Each activation row is quantized to int8 in blocks of 32 values, one float scale per block.
 * q8_matmul: int8 weights with one float scale per output row (models/qlinear.py's Int8Linear):
 *   y[i, r] = wscale[r] * sum_b xscale[i, b] * dot(w[r, 32b : 32b+32], xq[i, 32b : 32b+32])
 * q4_matmul: 4-bit weights in groups of 32, w = scale * (q - 8) + zero (Int4Linear's values), the 32
 *   values of a group in 16 bytes, byte j holding q[j] (low nibble) and q[j + 16] (high nibble), and
 *   each group's scale and zero as a pair of float16:
 *   y[i, r] = sum_b xscale[i, b] * (scale[r, b] * dot(q, xq) + (zero[r, b] - 8 scale[r, b]) * sum(xq))
 * The dot products run on 8-bit integer multiplies (vpmaddubsw), so a weight costs one byte read
 * and a fraction of an instruction: torch's int8 kernel converts each weight to float first,
 * which leaves an AVX2 CPU compute-bound (bench/RESULTS.md).
 *
 * Built at run time by models/native_kernels.py; nothing here depends on Python or torch.
 */
#include <float.h>
#include <immintrin.h>
#include <math.h>
#include <stdint.h>

#include "q8.h"

int q8_block(void) { return BLOCK; }

/* Each block of 32: d = max |x| / 127, q = x / d rounded to nearest even (lrintf's rounding, which
 * _mm256_cvtps_epi32 shares under the default rounding mode), and the sum of the q. */
static void quantize_row(const float *x, int64_t k, int8_t *q, float *scale, float *sums) {
  const __m256 magnitude = _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFFFFFF));
  for (int64_t b = 0; b < k / BLOCK; b++) {
    const float *xb = x + b * BLOCK;
    __m256 v[4], largest = _mm256_setzero_ps();
    for (int i = 0; i < 4; i++) {
      v[i] = _mm256_loadu_ps(xb + 8 * i);
      largest = _mm256_max_ps(largest, _mm256_and_ps(v[i], magnitude));
    }
    __m128 l = _mm_max_ps(_mm256_castps256_ps128(largest), _mm256_extractf128_ps(largest, 1));
    l = _mm_max_ps(l, _mm_movehl_ps(l, l));
    l = _mm_max_ss(l, _mm_shuffle_ps(l, l, 1));
    float d = _mm_cvtss_f32(l) / 127.f, inverse = d > 0.f ? 1.f / d : 0.f;
    if (!(inverse <= FLT_MAX)) d = 0.f, inverse = 0.f; /* a block of denormals: zeros */
    scale[b] = d;
    __m256i ints[4];
    for (int i = 0; i < 4; i++) ints[i] = _mm256_cvtps_epi32(_mm256_mul_ps(v[i], _mm256_set1_ps(inverse)));
    /* int32 -> int8 packs lane-wise: [0 1 | 2 3] 16-bit, then bytes; a permute puts the 32 back in order */
    __m256i packed = _mm256_packs_epi16(_mm256_packs_epi32(ints[0], ints[1]), _mm256_packs_epi32(ints[2], ints[3]));
    packed = _mm256_permutevar8x32_epi32(packed, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
    _mm256_storeu_si256((__m256i *)(q + b * BLOCK), packed);
    if (sums) {
      __m256i total = _mm256_add_epi32(_mm256_add_epi32(ints[0], ints[1]), _mm256_add_epi32(ints[2], ints[3]));
      __m128i t = _mm_add_epi32(_mm256_castsi256_si128(total), _mm256_extracti128_si256(total, 1));
      t = _mm_add_epi32(t, _mm_shuffle_epi32(t, 0x4E));
      t = _mm_add_epi32(t, _mm_shuffle_epi32(t, 0xB1));
      sums[b] = (float)_mm_cvtsi128_si32(t);
    }
  }
}

static inline float sum8(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_hadd_ps(s, s);
  s = _mm_hadd_ps(s, s);
  return _mm_cvtss_f32(s);
}

/* acc + scale * (the 32 products of one block, as 8 partial sums) */
static inline __m256 dot_block(const int8_t *w, const int8_t *q, float scale, __m256 acc) {
  const __m256i ones = _mm256_set1_epi16(1);
  __m256i wv = _mm256_loadu_si256((const __m256i *)w);
  __m256i qv = _mm256_loadu_si256((const __m256i *)q);
  /* vpmaddubsw multiplies unsigned by signed bytes: move q's sign onto w */
  __m256i products = _mm256_maddubs_epi16(_mm256_sign_epi8(qv, qv), _mm256_sign_epi8(wv, qv));
  return _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_madd_epi16(products, ones)), _mm256_set1_ps(scale), acc);
}

/* sum_b scale[b] * dot(w[32b..], q[32b..]) over k / 32 blocks, in two chains of multiply-adds */
static inline float dot_row(const int8_t *w, const int8_t *q, const float *scale, int64_t blocks) {
  __m256 even = _mm256_setzero_ps(), odd = _mm256_setzero_ps();
  int64_t b = 0;
  for (; b + 2 <= blocks; b += 2) {
    even = dot_block(w + b * BLOCK, q + b * BLOCK, scale[b], even);
    odd = dot_block(w + (b + 1) * BLOCK, q + (b + 1) * BLOCK, scale[b + 1], odd);
  }
  if (b < blocks) even = dot_block(w + b * BLOCK, q + b * BLOCK, scale[b], even);
  return sum8(_mm256_add_ps(even, odd));
}

/* x: [m, k] float32 -> xq [m, k] int8, xscale and xsum [m, k/32] (each block's scale and the sum of its
 * int8 values). k must be a multiple of 32. */
void quantize_rows(const float *x, int64_t m, int64_t k, int8_t *xq, float *xscale, float *xsum) {
  int64_t blocks = k / BLOCK;
  for (int64_t i = 0; i < m; i++) quantize_row(x + i * k, k, xq + i * k, xscale + i * blocks, xsum + i * blocks);
}

/* Four activation rows against one weight row: each weight block is loaded and made non-negative once
 * (vpmaddubsw's unsigned side), and each row takes the weights' signs. out[i] = sum over blocks. */
static inline void dot_rows4(const int8_t *w, const int8_t *q, int64_t k, const float *xscale, int64_t blocks,
                             float out[4]) {
  const __m256i ones = _mm256_set1_epi16(1);
  __m256 acc[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
  for (int64_t b = 0; b < blocks; b++) {
    __m256i wv = _mm256_loadu_si256((const __m256i *)(w + b * BLOCK));
    __m256i magnitude = _mm256_sign_epi8(wv, wv);
    for (int i = 0; i < 4; i++) {
      __m256i qv = _mm256_loadu_si256((const __m256i *)(q + i * k + b * BLOCK));
      __m256i sums = _mm256_madd_epi16(_mm256_maddubs_epi16(magnitude, _mm256_sign_epi8(qv, wv)), ones);
      acc[i] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sums), _mm256_set1_ps(xscale[i * blocks + b]), acc[i]);
    }
  }
  for (int i = 0; i < 4; i++) out[i] = sum8(acc[i]);
}

/* Output rows are shared out `schedule(guided)`: on a busy machine (the app's server threads and clients
 * share its cores) a thread that is preempted leaves its rows to the others instead of holding up the
 * product; static halves made an 8-row step ~9% slower under load and are no faster when idle. */

/* y [m, n] = quantized rows (xq, xscale) times w [n, k] int8 with one float scale per row. */
void q8_multiply(const int8_t *xq, const float *xscale, int64_t m, int64_t k, const int8_t *w, const float *wscale,
                 int64_t n, float *y, int threads) {
  int64_t blocks = k / BLOCK;
#pragma omp parallel for num_threads(threads) schedule(guided)
  for (int64_t r = 0; r < n; r++) {
    const int8_t *wr = w + r * k;
    int64_t i = 0;
    for (; i + 4 <= m; i += 4) {
      float out[4];
      dot_rows4(wr, xq + i * k, k, xscale + i * blocks, blocks, out);
      for (int j = 0; j < 4; j++) y[(i + j) * n + r] = wscale[r] * out[j];
    }
    for (; i < m; i++) y[i * n + r] = wscale[r] * dot_row(wr, xq + i * k, xscale + i * blocks, blocks);
  }
}

/* x: [m, k] float32; w: [n, k] int8; wscale: [n] float32; xq: [m, k] and xscale: [m, k/32] scratch;
 * y: [m, n] float32. k must be a multiple of 32. */
void q8_matmul(const float *x, int64_t m, int64_t k, const int8_t *w, const float *wscale, int64_t n,
               int8_t *xq, float *xscale, float *y, int threads) {
  int64_t blocks = k / BLOCK;
  for (int64_t i = 0; i < m; i++) quantize_row(x + i * k, k, xq + i * k, xscale + i * blocks, 0);
  q8_multiply(xq, xscale, m, k, w, wscale, n, y, threads);
}

static inline __m256i nibbles32(const uint8_t *w) {
  const __m128i low4 = _mm_set1_epi8(0x0F);
  __m128i raw = _mm_loadu_si128((const __m128i *)w);
  return _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(raw, 4), low4), _mm_and_si128(raw, low4));
}

/* 8 float16 (scale, zero) pairs -> scales and zeros, each 8 floats in block order. */
static inline void scales_zeros8(const uint16_t *sz, __m256 *scales, __m256 *zeros) {
  __m256 a = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)sz));       /* s0 z0 s1 z1 | s2 z2 s3 z3 */
  __m256 b = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(sz + 8))); /* s4 z4 s5 z5 | s6 z6 s7 z7 */
  /* per 128-bit lane: s0 s1 s4 s5 | s2 s3 s6 s7, then 64-bit pairs into order */
  *scales = _mm256_castpd_ps(_mm256_permute4x64_pd(_mm256_castps_pd(_mm256_shuffle_ps(a, b, 0x88)), 0xD8));
  *zeros = _mm256_castpd_ps(_mm256_permute4x64_pd(_mm256_castps_pd(_mm256_shuffle_ps(a, b, 0xDD)), 0xD8));
}

/* sum_b xscale[b] * (scale[b] * dot(q, xq) + (zero[b] - 8 scale[b]) * xsum[b]); sz = float16 [scale, zero]
 * pairs. Eight blocks at a time: their scales, zeros and the shift term as vectors, each block's
 * factor picked out of a vector instead of computed alone. */
static inline float dot_row4(const uint8_t *w, const uint16_t *sz, const int8_t *q, const float *xscale,
                             const float *xsum, int64_t blocks) {
  const __m256i ones = _mm256_set1_epi16(1);
  __m256 acc = _mm256_setzero_ps(), shift = _mm256_setzero_ps();
  __m256 part[4] = {acc, acc, acc, acc}; /* four chains of multiply-adds, not one long one */
  int64_t b = 0;
  for (; b + 8 <= blocks; b += 8) {
    __m256 scales, zeros;
    scales_zeros8(sz + 2 * b, &scales, &zeros);
    __m256 xs = _mm256_loadu_ps(xscale + b);
    __m256 factors = _mm256_mul_ps(xs, scales);
    shift = _mm256_fmadd_ps(_mm256_mul_ps(xs, _mm256_loadu_ps(xsum + b)),
                            _mm256_fnmadd_ps(_mm256_set1_ps(8.f), scales, zeros), shift);
    for (int j = 0; j < 8; j++) {
      __m256i qv = _mm256_loadu_si256((const __m256i *)(q + (b + j) * BLOCK));
      __m256i sums = _mm256_madd_epi16(_mm256_maddubs_epi16(nibbles32(w + (b + j) * BLOCK / 2), qv), ones);
      __m256 factor = _mm256_permutevar8x32_ps(factors, _mm256_set1_epi32(j));
      part[j % 4] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sums), factor, part[j % 4]);
    }
  }
  acc = _mm256_add_ps(_mm256_add_ps(part[0], part[1]), _mm256_add_ps(part[2], part[3]));
  float tail = 0.f;
  for (; b < blocks; b++) {
    __m256i qv = _mm256_loadu_si256((const __m256i *)(q + b * BLOCK));
    __m256i sums = _mm256_madd_epi16(_mm256_maddubs_epi16(nibbles32(w + b * BLOCK / 2), qv), ones);
    float scale = _cvtsh_ss(sz[2 * b]), zero = _cvtsh_ss(sz[2 * b + 1]);
    acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sums), _mm256_set1_ps(xscale[b] * scale), acc);
    tail += xscale[b] * (zero - 8.f * scale) * xsum[b];
  }
  return sum8(_mm256_add_ps(acc, shift)) + tail;
}

/* dot_row4 for four activation rows at once: each group's nibbles unpacked and its scales converted once. */
static inline void dot_rows4_q4(const uint8_t *w, const uint16_t *sz, const int8_t *q, int64_t k,
                                const float *xscale, const float *xsum, int64_t blocks, float out[4]) {
  const __m256i ones = _mm256_set1_epi16(1);
  __m256 acc[4], shift[4];
  for (int i = 0; i < 4; i++) acc[i] = shift[i] = _mm256_setzero_ps();
  int64_t b = 0;
  for (; b + 8 <= blocks; b += 8) {
    __m256 scales, zeros;
    scales_zeros8(sz + 2 * b, &scales, &zeros);
    __m256 offsets = _mm256_fnmadd_ps(_mm256_set1_ps(8.f), scales, zeros);
    __m256 factors[4];
    for (int i = 0; i < 4; i++) {
      __m256 xs = _mm256_loadu_ps(xscale + i * blocks + b);
      factors[i] = _mm256_mul_ps(xs, scales);
      shift[i] = _mm256_fmadd_ps(_mm256_mul_ps(xs, _mm256_loadu_ps(xsum + i * blocks + b)), offsets, shift[i]);
    }
    for (int j = 0; j < 8; j++) {
      __m256i wv = nibbles32(w + (b + j) * BLOCK / 2);
      __m256i lane = _mm256_set1_epi32(j);
      for (int i = 0; i < 4; i++) {
        __m256i qv = _mm256_loadu_si256((const __m256i *)(q + i * k + (b + j) * BLOCK));
        __m256i sums = _mm256_madd_epi16(_mm256_maddubs_epi16(wv, qv), ones);
        acc[i] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sums), _mm256_permutevar8x32_ps(factors[i], lane), acc[i]);
      }
    }
  }
  for (int i = 0; i < 4; i++) {
    float tail = 0.f;
    __m256 rest = _mm256_setzero_ps();
    for (int64_t t = b; t < blocks; t++) {
      __m256i qv = _mm256_loadu_si256((const __m256i *)(q + i * k + t * BLOCK));
      __m256i sums = _mm256_madd_epi16(_mm256_maddubs_epi16(nibbles32(w + t * BLOCK / 2), qv), ones);
      float scale = _cvtsh_ss(sz[2 * t]), zero = _cvtsh_ss(sz[2 * t + 1]), xs = xscale[i * blocks + t];
      rest = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sums), _mm256_set1_ps(xs * scale), rest);
      tail += xs * (zero - 8.f * scale) * xsum[i * blocks + t];
    }
    out[i] = sum8(_mm256_add_ps(_mm256_add_ps(acc[i], shift[i]), rest)) + tail;
  }
}

/* y [m, n] = quantized rows (xq, xscale, xsum) times 4-bit w [n, k/2] with sz [n, k/32, 2] float16. */
void q4_multiply(const int8_t *xq, const float *xscale, const float *xsum, int64_t m, int64_t k, const uint8_t *w,
                 const uint16_t *sz, int64_t n, float *y, int threads) {
  int64_t blocks = k / BLOCK;
#pragma omp parallel for num_threads(threads) schedule(guided)
  for (int64_t r = 0; r < n; r++) {
    const uint8_t *wr = w + r * (k / 2);
    const uint16_t *szr = sz + r * blocks * 2;
    int64_t i = 0;
    for (; i + 4 <= m; i += 4) {
      float out[4];
      dot_rows4_q4(wr, szr, xq + i * k, k, xscale + i * blocks, xsum + i * blocks, blocks, out);
      for (int j = 0; j < 4; j++) y[(i + j) * n + r] = out[j];
    }
    for (; i < m; i++)
      y[i * n + r] = dot_row4(wr, szr, xq + i * k, xscale + i * blocks, xsum + i * blocks, blocks);
  }
}

/* x: [m, k] float32; w: [n, k/2] packed nibbles; sz: [n, k/32, 2] float16 (scale, zero);
 * xq: [m, k], xscale and xsum: [m, k/32] scratch; y: [m, n] float32. */
void q4_matmul(const float *x, int64_t m, int64_t k, const uint8_t *w, const uint16_t *sz, int64_t n,
               int8_t *xq, float *xscale, float *xsum, float *y, int threads) {
  quantize_rows(x, m, k, xq, xscale, xsum);
  q4_multiply(xq, xscale, xsum, m, k, w, sz, n, y, threads);
}

/* y = x / sqrt(mean(x^2) + eps) * weight, row by row (x, y: [rows, dim] float32; weight: [dim]).
 * One thread: a decode step's norms are ~100 rows of a few hundred values, where waking a second
 * thread costs more than the arithmetic. */
void rms_norm(const float *x, const float *weight, float *y, int64_t rows, int64_t dim, float eps) {
  for (int64_t r = 0; r < rows; r++) {
    const float *xr = x + r * dim;
    float *yr = y + r * dim;
    double total = 0.0;
    for (int64_t i = 0; i < dim; i++) total += (double)xr[i] * xr[i];
    float inverse = (float)(1.0 / sqrt(total / dim + eps));
    for (int64_t i = 0; i < dim; i++) yr[i] = xr[i] * inverse * weight[i];
  }
}

/* The 4-bit weights as float32: out [n, k] = scale * (q - 8) + zero, for products too wide for the
 * int8-activation kernels (a prompt's prefill), which then run as one float matrix product. */
void q4_dequantize(const uint8_t *w, const uint16_t *sz, int64_t n, int64_t k, float *out, int threads) {
  int64_t blocks = k / BLOCK;
#pragma omp parallel for num_threads(threads) schedule(guided)
  for (int64_t r = 0; r < n; r++) {
    for (int64_t b = 0; b < blocks; b++) {
      const uint8_t *wb = w + r * (k / 2) + b * (BLOCK / 2);
      float scale = _cvtsh_ss(sz[(r * blocks + b) * 2]), zero = _cvtsh_ss(sz[(r * blocks + b) * 2 + 1]);
      float *o = out + r * k + b * BLOCK;
      for (int j = 0; j < BLOCK / 2; j++) {
        o[j] = scale * (float)((wb[j] & 15) - 8) + zero;
        o[j + BLOCK / 2] = scale * (float)((wb[j] >> 4) - 8) + zero;
      }
    }
  }
}
