/* What q8_matmul.c offers layers.c: int8 activations and the products that read them. */
#ifndef Q8_H
#define Q8_H
#include <stdint.h>

#define BLOCK 32

void quantize_rows(const float *x, int64_t m, int64_t k, int8_t *xq, float *xscale, float *xsum);
void q8_multiply(const int8_t *xq, const float *xscale, int64_t m, int64_t k, const int8_t *w, const float *wscale,
                 int64_t n, float *y, int threads);
void q4_multiply(const int8_t *xq, const float *xscale, const float *xsum, int64_t m, int64_t k, const uint8_t *w,
                 const uint16_t *sz, int64_t n, float *y, int threads);
void rms_norm(const float *x, const float *weight, float *y, int64_t rows, int64_t dim, float eps);

#endif
