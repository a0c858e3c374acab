/* A decode step's whole layer stack in one call: one new token per row through every transformer
 * layer (norms, quantized products, rotary embedding, the KV cache, attention, the MLP).
 *
 * models/decode_step.py runs the same layers as a Python loop over the model's modules: about 40
 * small torch operations a layer, each costing more in dispatch than in arithmetic on a small model
 * (Gemma 3 270M: 18 layers, ~700 operations a token). Here they are plain loops, the products are
 * q8_matmul.c's (a layer's input is quantized once for its q/k/v and once for gate/up), and Python
 * is entered once a step. Layouts are those of the Python side (decode_step.py sets them up):
 *   x [rows, hidden]; q/k/v outputs head-major [rows, heads * head_dim];
 *   keys/values [rows, kv_heads, capacity, head_dim], column `length` the new token's, a row's real
 *   tokens in columns start[row] .. length (left padding before them);
 *   cos/sin [2, rows, head_dim]: two rotation tables (Gemma's local and global layers; the same twice
 *   elsewhere), rotate-half form.
 * A layer's norms: in (before attention), attn_out (after it, Gemma), ff_in (before the MLP), ff_out
 * (after it, Gemma), q/k (per head, Gemma); a NULL norm is skipped.
 */
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "q8.h"

typedef struct {
  int32_t bits; /* 8: int8 rows, one float32 scale each; 4: nibbles, float16 (scale, zero) per group of 32 */
  int32_t unused;
  int64_t n, k;
  const void *w, *scale;
  const float *bias; /* [n] or NULL */
} Linear;

typedef struct {
  Linear q, k, v, o, gate, up, down;
  const float *norm_in, *norm_attn_out, *norm_ff_in, *norm_ff_out, *norm_q, *norm_k;
  float *keys, *values;
  int64_t capacity, window; /* window 0: full attention */
  int32_t rope, unused;     /* which rotation table */
} Layer;

typedef struct {
  int64_t hidden, heads, kv_heads, head_dim, ffn;
  int32_t act; /* 0: silu, 1: gelu (tanh approximation) */
  int32_t threads;
  float eps, scaling;
} Config;

int layers_abi(void) { return (int)(sizeof(Linear) * 1000 + sizeof(Layer) * 10 + sizeof(Config) % 10); }

typedef struct {
  int8_t *xq;
  float *xscale, *xsum;
} Quantized;

static void linear(const Linear *l, const Quantized *in, int64_t m, float *y, int threads) {
  if (l->bits == 8)
    q8_multiply(in->xq, in->xscale, m, l->k, (const int8_t *)l->w, (const float *)l->scale, l->n, y, threads);
  else
    q4_multiply(in->xq, in->xscale, in->xsum, m, l->k, (const uint8_t *)l->w, (const uint16_t *)l->scale, l->n, y,
                threads);
  if (l->bias)
    for (int64_t i = 0; i < m; i++)
      for (int64_t r = 0; r < l->n; r++) y[i * l->n + r] += l->bias[r];
}

static inline float dot(const float *a, const float *b, int64_t n) {
  int64_t i = 0;
  __m256 acc = _mm256_setzero_ps();
  for (; i + 8 <= n; i += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), acc);
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(acc), _mm256_extractf128_ps(acc, 1));
  s = _mm_hadd_ps(s, s);
  s = _mm_hadd_ps(s, s);
  float total = _mm_cvtss_f32(s);
  for (; i < n; i++) total += a[i] * b[i];
  return total;
}

static void rotate(float *v, const float *cos, const float *sin, int64_t dim) {
  int64_t half = dim / 2;
  for (int64_t i = 0; i < half; i++) {
    float a = v[i], b = v[i + half];
    v[i] = a * cos[i] - b * sin[i];
    v[i + half] = b * cos[i + half] + a * sin[i + half];
  }
}

/* One (row, head): softmax(q . keys[lo..length] * scaling) . values, into out [head_dim]. */
static void attend(const float *q, const float *keys, const float *values, int64_t lo, int64_t length, int64_t dim,
                   float scaling, float *scores, float *out) {
  float largest = -INFINITY;
  for (int64_t j = lo; j <= length; j++) {
    float s = dot(q, keys + j * dim, dim) * scaling;
    scores[j - lo] = s;
    largest = s > largest ? s : largest;
  }
  float total = 0.f;
  for (int64_t j = lo; j <= length; j++) total += scores[j - lo] = expf(scores[j - lo] - largest);
  memset(out, 0, dim * sizeof(float));
  for (int64_t j = lo; j <= length; j++) {
    float p = scores[j - lo] / total;
    const float *v = values + j * dim;
    for (int64_t d = 0; d < dim; d++) out[d] += p * v[d];
  }
}

static inline float activate(float g, int act) {
  if (act == 0) return g / (1.f + expf(-g));
  return 0.5f * g * (1.f + tanhf(0.7978845608028654f * (g + 0.044715f * g * g * g)));
}

static void residual(float *x, float *y, const float *norm, int64_t m, int64_t dim, float eps) {
  if (norm) rms_norm(y, norm, y, m, dim, eps);
  for (int64_t i = 0; i < m * dim; i++) x[i] += y[i];
}

/* Returns 0, or -1 when scratch memory could not be had (nothing written then). */
int decode_layers(const Config *c, const Layer *layers, int64_t count, float *x, int64_t m, const int64_t *start,
                  int64_t length, const float *cos, const float *sin) {
  int64_t hd = c->head_dim, qdim = c->heads * hd, kvdim = c->kv_heads * hd;
  int64_t widest = c->hidden > qdim ? c->hidden : qdim;
  widest = widest > c->ffn ? widest : c->ffn;
  int64_t group = c->heads / c->kv_heads, span = length + 1;
  float *h = malloc(sizeof(float) * m * widest), *q = malloc(sizeof(float) * m * qdim);
  float *k = malloc(sizeof(float) * m * kvdim), *v = malloc(sizeof(float) * m * kvdim);
  float *att = malloc(sizeof(float) * m * qdim), *y = malloc(sizeof(float) * m * widest);
  float *gate = malloc(sizeof(float) * m * c->ffn), *up = malloc(sizeof(float) * m * c->ffn);
  float *scores = malloc(sizeof(float) * m * c->heads * span);
  Quantized in = {malloc(m * widest), malloc(sizeof(float) * m * (widest / BLOCK)),
                  malloc(sizeof(float) * m * (widest / BLOCK))};
  int failed = !(h && q && k && v && att && y && gate && up && scores && in.xq && in.xscale && in.xsum);
  for (int64_t index = 0; index < count && !failed; index++) {
    const Layer *l = layers + index;
    /* attention */
    rms_norm(x, l->norm_in, h, m, c->hidden, c->eps);
    quantize_rows(h, m, c->hidden, in.xq, in.xscale, in.xsum);
    linear(&l->q, &in, m, q, c->threads);
    linear(&l->k, &in, m, k, c->threads);
    linear(&l->v, &in, m, v, c->threads);
    if (l->norm_q) rms_norm(q, l->norm_q, q, m * c->heads, hd, c->eps);
    if (l->norm_k) rms_norm(k, l->norm_k, k, m * c->kv_heads, hd, c->eps);
    for (int64_t r = 0; r < m; r++) {
      const float *cr = cos + (l->rope * m + r) * hd, *sr = sin + (l->rope * m + r) * hd;
      for (int64_t head = 0; head < c->heads; head++) rotate(q + r * qdim + head * hd, cr, sr, hd);
      for (int64_t head = 0; head < c->kv_heads; head++) {
        rotate(k + r * kvdim + head * hd, cr, sr, hd);
        int64_t at = ((r * c->kv_heads + head) * l->capacity + length) * hd;
        memcpy(l->keys + at, k + r * kvdim + head * hd, sizeof(float) * hd);
        memcpy(l->values + at, v + r * kvdim + head * hd, sizeof(float) * hd);
      }
    }
    int64_t pairs = m * c->heads;
#pragma omp parallel for num_threads(c->threads) schedule(static) if (pairs * span * hd > (1 << 17))
    for (int64_t pair = 0; pair < pairs; pair++) {
      int64_t r = pair / c->heads, head = pair % c->heads, kv = head / group;
      int64_t lo = start[r];
      if (l->window > 0 && length - l->window + 1 > lo) lo = length - l->window + 1;
      int64_t base = (r * c->kv_heads + kv) * l->capacity * hd;
      attend(q + r * qdim + head * hd, l->keys + base, l->values + base, lo, length, hd, c->scaling,
             scores + pair * span, att + r * qdim + head * hd);
    }
    quantize_rows(att, m, qdim, in.xq, in.xscale, in.xsum);
    linear(&l->o, &in, m, y, c->threads);
    residual(x, y, l->norm_attn_out, m, c->hidden, c->eps);
    /* MLP */
    rms_norm(x, l->norm_ff_in, h, m, c->hidden, c->eps);
    quantize_rows(h, m, c->hidden, in.xq, in.xscale, in.xsum);
    linear(&l->gate, &in, m, gate, c->threads);
    linear(&l->up, &in, m, up, c->threads);
    for (int64_t i = 0; i < m * c->ffn; i++) gate[i] = activate(gate[i], c->act) * up[i];
    quantize_rows(gate, m, c->ffn, in.xq, in.xscale, in.xsum);
    linear(&l->down, &in, m, y, c->threads);
    residual(x, y, l->norm_ff_out, m, c->hidden, c->eps);
  }
  free(h), free(q), free(k), free(v), free(att), free(y), free(gate), free(up), free(scores);
  free(in.xq), free(in.xscale), free(in.xsum);
  return failed ? -1 : 0;
}
