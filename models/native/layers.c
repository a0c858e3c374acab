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
  __m256 acc[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
  for (; i + 32 <= n; i += 32) /* four chains: one chain waits on each multiply-add's latency */
    for (int j = 0; j < 4; j++)
      acc[j] = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 8 * j), _mm256_loadu_ps(b + i + 8 * j), acc[j]);
  for (; i + 8 <= n; i += 8) acc[0] = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), acc[0]);
  __m256 all = _mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3]));
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(all), _mm256_extractf128_ps(all, 1));
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

/* exp(x) for 8 floats: x = n ln2 + r, exp(r) by a degree-7 polynomial (relative error ~1e-7), times 2^n.
 * Arguments are clamped to where float32 exp is finite and normal; NaN gives NaN. */
static inline __m256 exp8(__m256 x) {
  x = _mm256_min_ps(_mm256_set1_ps(88.f), _mm256_max_ps(_mm256_set1_ps(-87.f), x)); /* a NaN stays NaN */
  __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504f)),
                             _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 p = _mm256_set1_ps(1.9875691500e-4f);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
  p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.f)));
  __m256i exponent = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(p, _mm256_castsi256_ps(exponent));
}

/* Attention of the `group` query heads that share a kv head (q: [group, dim]) over keys lo .. hi - 1 of
 * one row: each key and value is read once for all of them (a decode step's attention is bound by
 * reading the cache). Leaves, per head h, the largest scaled score top[h], total[h] = sum of
 * exp(score - top[h]) and out[h] = sum of exp(score - top[h]) * value, unnormalized, so that chunks of
 * the keys can be done apart and merged (`attention`). scores: [group, hi - lo] scratch. */
static void attend_chunk(const float *q, const float *keys, const float *values, int64_t lo, int64_t hi,
                         int64_t dim, int64_t group, float scaling, float *scores, float *top, float *total,
                         float *out) {
  int64_t n = hi - lo;
  memset(out, 0, sizeof(float) * group * dim);
  if (n <= 0) {
    for (int64_t h = 0; h < group; h++) top[h] = -INFINITY, total[h] = 0.f;
    return;
  }
  for (int64_t j = 0; j < n; j++)
    for (int64_t h = 0; h < group; h++) scores[h * n + j] = dot(q + h * dim, keys + (lo + j) * dim, dim) * scaling;
  for (int64_t h = 0; h < group; h++) {
    float *s = scores + h * n, largest = -INFINITY, sum = 0.f;
    for (int64_t j = 0; j < n; j++) largest = s[j] > largest ? s[j] : largest;
    int64_t j = 0;
    __m256 sums = _mm256_setzero_ps();
    for (; j + 8 <= n; j += 8) {
      __m256 e = exp8(_mm256_sub_ps(_mm256_loadu_ps(s + j), _mm256_set1_ps(largest)));
      _mm256_storeu_ps(s + j, e);
      sums = _mm256_add_ps(sums, e);
    }
    for (; j < n; j++) sum += s[j] = expf(s[j] - largest);
    __m128 t = _mm_add_ps(_mm256_castps256_ps128(sums), _mm256_extractf128_ps(sums, 1));
    t = _mm_hadd_ps(t, t);
    t = _mm_hadd_ps(t, t);
    top[h] = largest, total[h] = sum + _mm_cvtss_f32(t);
  }
  for (int64_t j = 0; j < n; j++) {
    const float *value = values + (lo + j) * dim;
    for (int64_t h = 0; h < group; h++) {
      __m256 p = _mm256_set1_ps(scores[h * n + j]);
      float *o = out + h * dim;
      int64_t d = 0;
      for (; d + 8 <= dim; d += 8)
        _mm256_storeu_ps(o + d, _mm256_fmadd_ps(p, _mm256_loadu_ps(value + d), _mm256_loadu_ps(o + d)));
      for (; d < dim; d++) o[d] += scores[h * n + j] * value[d];
    }
  }
}

/* act(g) * u for 8 values. Both activations are g * sigmoid(t): silu t = g; the tanh form of gelu,
 * 0.5 g (1 + tanh(c (g + 0.044715 g^3))), is g * sigmoid(2c (g + 0.044715 g^3)). */
static inline __m256 activate8(__m256 g, __m256 u, int act) {
  __m256 t = g;
  if (act != 0) {
    __m256 inner = _mm256_fmadd_ps(_mm256_mul_ps(_mm256_set1_ps(0.044715f), g), _mm256_mul_ps(g, g), g);
    t = _mm256_mul_ps(_mm256_set1_ps(2.f * 0.7978845608028654f), inner);
  }
  __m256 denominator = _mm256_add_ps(_mm256_set1_ps(1.f), exp8(_mm256_sub_ps(_mm256_setzero_ps(), t)));
  return _mm256_mul_ps(_mm256_div_ps(g, denominator), u);
}

static inline float activate(float g, int act) {
  if (act == 0) return g / (1.f + expf(-g));
  return 0.5f * g * (1.f + tanhf(0.7978845608028654f * (g + 0.044715f * g * g * g)));
}

/* gate[i] = act(gate[i]) * up[i] over `count` values, shared out between threads when there are many. */
static void gated(float *gate, const float *up, int64_t count, int act, int threads) {
  int64_t vectors = count / 8;
#pragma omp parallel for num_threads(threads) schedule(static) if (count >= 8192)
  for (int64_t i = 0; i < vectors; i++)
    _mm256_storeu_ps(gate + 8 * i, activate8(_mm256_loadu_ps(gate + 8 * i), _mm256_loadu_ps(up + 8 * i), act));
  for (int64_t i = vectors * 8; i < count; i++) gate[i] = activate(gate[i], act) * up[i];
}

static void residual(float *x, float *y, const float *norm, int64_t m, int64_t dim, float eps) {
  if (norm) rms_norm(y, norm, y, m, dim, eps);
  for (int64_t i = 0; i < m * dim; i++) x[i] += y[i];
}

typedef struct {
  int64_t chunks, chunk; /* keys per row split into `chunks` pieces of at most `chunk` */
  float *scores, *top, *total, *out;
} Attention;

/* Each row's keys split so that a step has at least two pieces of work per thread where it can (one row
 * of a model with one kv head is otherwise one thread's work), pieces of about 64 keys or more (a
 * layer whose window holds fewer keys takes fewer pieces: `attention`). */
static int attention_scratch(const Config *c, int64_t m, int64_t span, Attention *a) {
  int64_t pairs = m * c->kv_heads > 0 ? m * c->kv_heads : 1, threads = c->threads > 0 ? c->threads : 1;
  int64_t want = (2 * threads + pairs - 1) / pairs;
  a->chunk = (span + want - 1) / want;
  a->chunk = a->chunk < 64 ? 64 : a->chunk;
  a->chunks = (span + a->chunk - 1) / a->chunk;
  int64_t units = pairs * a->chunks, group = c->heads / c->kv_heads;
  a->scores = malloc(sizeof(float) * units * group * a->chunk);
  a->top = malloc(sizeof(float) * units * group);
  a->total = malloc(sizeof(float) * units * group);
  a->out = malloc(sizeof(float) * units * group * c->head_dim);
  return a->scores && a->top && a->total && a->out;
}

/* att [m, heads * head_dim] = softmax(q . keys * scaling) . values for the new token of each row, over
 * the row's columns start[row] .. length (the last `window` of them in a windowed layer). */
static void attention(const Config *c, const Layer *l, int64_t m, const float *q, const int64_t *start,
                      int64_t length, const Attention *a, float *att) {
  int64_t hd = c->head_dim, qdim = c->heads * hd, group = c->heads / c->kv_heads;
  int64_t lowest = l->window > 0 && length - l->window + 1 > 0 ? length - l->window + 1 : 0;
  int64_t range = length + 1 - lowest, pieces = (range + 63) / 64; /* a window's keys: fewer pieces */
  pieces = pieces < a->chunks ? pieces : a->chunks;
  int64_t chunk = (range + pieces - 1) / pieces, units = m * c->kv_heads * pieces; /* chunk <= a->chunk */
#pragma omp parallel for num_threads(c->threads) schedule(dynamic) if (units * chunk * group * hd > (1 << 17))
  for (int64_t unit = 0; unit < units; unit++) {
    int64_t piece = unit % pieces, pair = unit / pieces, r = pair / c->kv_heads, kv = pair % c->kv_heads;
    int64_t first = start[r];
    if (l->window > 0 && length - l->window + 1 > first) first = length - l->window + 1;
    int64_t lo = lowest + piece * chunk, hi = lo + chunk;
    lo = lo > first ? lo : first;
    hi = hi < length + 1 ? hi : length + 1;
    int64_t base = (r * c->kv_heads + kv) * l->capacity * hd;
    attend_chunk(q + r * qdim + kv * group * hd, l->keys + base, l->values + base, lo, hi, hd, group, c->scaling,
                 a->scores + unit * group * a->chunk, a->top + unit * group, a->total + unit * group,
                 a->out + unit * group * hd);
  }
  for (int64_t pair = 0; pair < m * c->kv_heads; pair++) /* merge each head's pieces */
    for (int64_t h = 0; h < group; h++) {
      int64_t r = pair / c->kv_heads, head = (pair % c->kv_heads) * group + h;
      float largest = -INFINITY, total = 0.f, *o = att + r * qdim + head * hd;
      for (int64_t piece = 0; piece < pieces; piece++) {
        float t = a->top[(pair * pieces + piece) * group + h];
        largest = t > largest ? t : largest;
      }
      memset(o, 0, sizeof(float) * hd);
      for (int64_t piece = 0; piece < pieces; piece++) {
        int64_t at = (pair * pieces + piece) * group + h;
        if (a->total[at] == 0.f) continue;
        float weight = expf(a->top[at] - largest);
        total += weight * a->total[at];
        const float *part = a->out + at * hd;
        for (int64_t d = 0; d < hd; d++) o[d] += weight * part[d];
      }
      for (int64_t d = 0; d < hd; d++) o[d] /= total;
    }
}

/* Returns 0, or -1 when scratch memory could not be had (nothing written then). */
int decode_layers(const Config *c, const Layer *layers, int64_t count, float *x, int64_t m, const int64_t *start,
                  int64_t length, const float *cos, const float *sin) {
  int64_t hd = c->head_dim, qdim = c->heads * hd, kvdim = c->kv_heads * hd;
  int64_t widest = c->hidden > qdim ? c->hidden : qdim;
  widest = widest > c->ffn ? widest : c->ffn;
  int64_t span = length + 1;
  float *h = malloc(sizeof(float) * m * widest), *q = malloc(sizeof(float) * m * qdim);
  float *k = malloc(sizeof(float) * m * kvdim), *v = malloc(sizeof(float) * m * kvdim);
  float *att = malloc(sizeof(float) * m * qdim), *y = malloc(sizeof(float) * m * widest);
  float *gate = malloc(sizeof(float) * m * c->ffn), *up = malloc(sizeof(float) * m * c->ffn);
  Attention scratch = {0};
  int ready = attention_scratch(c, m, span, &scratch);
  Quantized in = {malloc(m * widest), malloc(sizeof(float) * m * (widest / BLOCK)),
                  malloc(sizeof(float) * m * (widest / BLOCK))};
  int failed = !(h && q && k && v && att && y && gate && up && ready && in.xq && in.xscale && in.xsum);
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
    attention(c, l, m, q, start, length, &scratch, att);
    quantize_rows(att, m, qdim, in.xq, in.xscale, in.xsum);
    linear(&l->o, &in, m, y, c->threads);
    residual(x, y, l->norm_attn_out, m, c->hidden, c->eps);
    /* MLP */
    rms_norm(x, l->norm_ff_in, h, m, c->hidden, c->eps);
    quantize_rows(h, m, c->hidden, in.xq, in.xscale, in.xsum);
    linear(&l->gate, &in, m, gate, c->threads);
    linear(&l->up, &in, m, up, c->threads);
    gated(gate, up, m * c->ffn, c->act, c->threads);
    quantize_rows(gate, m, c->ffn, in.xq, in.xscale, in.xsum);
    linear(&l->down, &in, m, y, c->threads);
    residual(x, y, l->norm_ff_out, m, c->hidden, c->eps);
  }
  free(h), free(q), free(k), free(v), free(att), free(y), free(gate), free(up);
  free(scratch.scores), free(scratch.top), free(scratch.total), free(scratch.out);
  free(in.xq), free(in.xscale), free(in.xsum);
  return failed ? -1 : 0;
}
