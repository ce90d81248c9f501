/* Decode kernels for x86-64 CPUs with AVX2 and FMA, float32. Built and loaded by
 * engine/models/cpu_kernels.py.
 *
 * The bodies below (linear, attention, rms_norm_rows, rope_store_kv, silu_mul) split their work
 * with orphaned `omp for` loops: called inside a parallel region they share it, so a whole
 * decoder layer runs in one region (baton_decode_layer_f32); each exported single-operation entry
 * point opens a region of its own around one body.
 *
 * linear, one token: decoding one sequence multiplies every weight matrix by one vector, so a
 * step's time is the time to stream the weights from memory once. W [n_out, n_in] (row-major) is
 * read eight rows at a time, each row one contiguous stream; ~90% of the machine's read bandwidth
 * where the BLAS GEMV of the CPU build of torch reaches ~50-65% (an AMD EPYC with 2 cores).
 *
 * linear, 2 to 64 tokens: tiles of 3 rows of X by 4 rows of W in twelve accumulators, each W row
 * block read once per call while X stays in cache; ~1.1-1.6x oneDNN's linear at these sizes.
 *
 * attention: one query token per sequence over its context in the paged KV pool, read in place
 * through the block table (no gather copy). Heads are grouped (GQA/MQA): query head h reads KV
 * head h / (num_heads / num_kv_heads).
 *
 * rms_norm_rows: the residual add and RMSNorm of a decoder layer in one pass per row (torch's CPU
 * rms_norm is a chain of six operators).
 *
 * Built with -ffp-contract=off: a product and a sum written apart stay apart (as in torch's
 * operators), so rope and the norms round as the torch path does.
 */
#include <immintrin.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>
#include <stdint.h>

static inline float hsum(__m256 v) {
    __m128 lo = _mm256_castps256_ps128(v), hi = _mm256_extractf128_ps(v, 1);
    lo = _mm_add_ps(lo, hi);
    lo = _mm_hadd_ps(lo, lo);
    lo = _mm_hadd_ps(lo, lo);
    return _mm_cvtss_f32(lo);
}

/* exp of 8 floats: Cody-Waite range reduction and the Cephes expf polynomial (about 1 ulp on
 * [-87, 88]; inputs are clamped to that range). */
static inline __m256 exp8(__m256 x) {
    x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.0f)), _mm256_set1_ps(88.0f));
    const __m256 n = _mm256_floor_ps(_mm256_fmadd_ps(x, _mm256_set1_ps(1.44269504088896341f),
                                                     _mm256_set1_ps(0.5f)));
    __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
    __m256 y = _mm256_set1_ps(1.9875691500e-4f);
    y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(1.3981999507e-3f));
    y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(8.3334519073e-3f));
    y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(4.1665795894e-2f));
    y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(1.6666665459e-1f));
    y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(5.0000001201e-1f));
    y = _mm256_fmadd_ps(y, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
    const __m256i pow2n = _mm256_slli_epi32(
        _mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(y, _mm256_castsi256_ps(pow2n));
}

/* row[i] = exp(row[i] - max) / sum over i, in place. */
static void softmax(float* row, int64_t n) {
    float max_score = row[0];
    for (int64_t i = 1; i < n; i++) max_score = row[i] > max_score ? row[i] : max_score;
    const __m256 max8 = _mm256_set1_ps(max_score);
    __m256 sum8 = _mm256_setzero_ps();
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) {
        const __m256 e = exp8(_mm256_sub_ps(_mm256_loadu_ps(row + i), max8));
        _mm256_storeu_ps(row + i, e);
        sum8 = _mm256_add_ps(sum8, e);
    }
    float sum = hsum(sum8);
    for (; i < n; i++) { row[i] = expf(row[i] - max_score); sum += row[i]; }
    const float inv = 1.0f / sum;
    for (i = 0; i < n; i++) row[i] *= inv;
}

static inline float dot(const float* w, const float* x, int64_t n_in) {
    __m256 acc = _mm256_setzero_ps();
    int64_t i = 0;
    for (; i + 8 <= n_in; i += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(w + i), _mm256_loadu_ps(x + i), acc);
    float s = hsum(acc);
    for (; i < n_in; i++) s += w[i] * x[i];
    return s;
}

/* ---- bodies: each splits its loop over the threads of the enclosing parallel region ---------- */

/* y[o] (+)= sum_i W[o, i] x[i] (+ b[o]) for one token: eight rows of W at a time, any n_out and
 * n_in. With accumulate, y += (W x + b), the same float ops as adding the result afterwards.
 * Row groups go to whichever thread is free (a static split made single-stream decode ~4%
 * slower on a shared 2-core machine, where a thread can lose its core for a while); the GEMM
 * below keeps its static split, which measured 2-8% faster there. */
static void gemv(const float* W, const float* x, const float* bias, float* y, int64_t n_out,
                 int64_t n_in, int accumulate) {
    const int64_t n_vec = n_in - n_in % 8;
    #pragma omp for schedule(dynamic, 4)
    for (int64_t g = 0; g < (n_out + 7) / 8; g++) {
        const int64_t o = g * 8;
        const float* rows = W + o * n_in;
        float s[8];
        if (o + 8 <= n_out) {
            __m256 acc[8];
            for (int r = 0; r < 8; r++) acc[r] = _mm256_setzero_ps();
            for (int64_t i = 0; i < n_vec; i += 8) {
                const __m256 xv = _mm256_loadu_ps(x + i);
                for (int r = 0; r < 8; r++)
                    acc[r] = _mm256_fmadd_ps(_mm256_loadu_ps(rows + r * n_in + i), xv, acc[r]);
            }
            for (int r = 0; r < 8; r++) {
                s[r] = hsum(acc[r]);
                for (int64_t i = n_vec; i < n_in; i++) s[r] += rows[r * n_in + i] * x[i];
            }
        } else {
            for (int64_t r = 0; r < n_out - o; r++) s[r] = dot(rows + r * n_in, x, n_in);
        }
        for (int64_t r = 0; r < 8 && o + r < n_out; r++) {
            const float v = bias ? s[r] + bias[o + r] : s[r];
            y[o + r] = accumulate ? y[o + r] + v : v;
        }
    }
}

/* Rows m..m+rows-1 of X (rows <= 3, a constant where inlined) against the four W rows w[]:
 * twelve accumulators at most, each W load used by every row. */
static inline __attribute__((always_inline)) void gemm_tile(
        const float* X, int64_t ldx, const float* const* w, const float* bias, float* Y,
        int64_t m, int rows, int64_t n0, int64_t num_n, int64_t N, int64_t K, int accumulate) {
    __m256 a[3][4];
    for (int r = 0; r < 3; r++)
        for (int j = 0; j < 4; j++) a[r][j] = _mm256_setzero_ps();
    for (int64_t k = 0; k < K; k += 8) {
        const __m256 b0 = _mm256_loadu_ps(w[0] + k), b1 = _mm256_loadu_ps(w[1] + k);
        const __m256 b2 = _mm256_loadu_ps(w[2] + k), b3 = _mm256_loadu_ps(w[3] + k);
        for (int r = 0; r < rows; r++) {
            const __m256 x = _mm256_loadu_ps(X + (m + r) * ldx + k);
            a[r][0] = _mm256_fmadd_ps(x, b0, a[r][0]); a[r][1] = _mm256_fmadd_ps(x, b1, a[r][1]);
            a[r][2] = _mm256_fmadd_ps(x, b2, a[r][2]); a[r][3] = _mm256_fmadd_ps(x, b3, a[r][3]);
        }
    }
    for (int r = 0; r < rows; r++)
        for (int64_t j = 0; j < num_n; j++) {
            float* y = Y + (m + r) * N + n0 + j;
            const float v = hsum(a[r][j]) + (bias ? bias[n0 + j] : 0.0f);
            *y = accumulate ? *y + v : v;
        }
}

/* Y [M, N] (+)= X W^T (+ b) for a few tokens (2 to 64): X [M, K] with row stride ldx, W [N, K],
 * K % 8 == 0. The last one or two rows of X get a tile of their own (a one-accumulator dot
 * product per output would take as long as three full tiles). */
static void gemm_small(const float* X, int64_t ldx, const float* W, const float* bias, float* Y,
                       int64_t M, int64_t N, int64_t K, int accumulate) {
    #pragma omp for schedule(static)
    for (int64_t n0 = 0; n0 < N; n0 += 4) {
        const int64_t num_n = N - n0 < 4 ? N - n0 : 4;
        const float* w[4];
        for (int64_t j = 0; j < 4; j++) w[j] = W + (n0 + (j < num_n ? j : 0)) * K;
        int64_t m = 0;
        for (; m + 3 <= M; m += 3) gemm_tile(X, ldx, w, bias, Y, m, 3, n0, num_n, N, K, accumulate);
        if (M - m == 2) gemm_tile(X, ldx, w, bias, Y, m, 2, n0, num_n, N, K, accumulate);
        else if (M - m == 1) gemm_tile(X, ldx, w, bias, Y, m, 1, n0, num_n, N, K, accumulate);
    }
}

/* One query token per sequence. q: row s at q + s * q_stride, [num_heads, head_dim]; out likewise
 * with out_stride; k_cache, v_cache: [num_blocks, block_size, num_kv_heads, head_dim];
 * block_tables: [num_seqs, max_blocks]; context_lens: [num_seqs] (>= 1). One job per (sequence,
 * KV head): each K and V row is read once for the query heads sharing it: scores for the whole
 * context, softmax, then the weighted sum of V accumulated in registers. Sets *failed when out
 * of memory. */
static void attention(const float* q, int64_t q_stride, const float* k_cache,
                      const float* v_cache, const int64_t* block_tables,
                      const int64_t* context_lens, float* out, int64_t out_stride,
                      int64_t num_seqs, int64_t num_heads, int64_t num_kv_heads, int64_t head_dim,
                      int64_t block_size, int64_t max_blocks, float scale, int* failed) {
    const int64_t group = num_heads / num_kv_heads;
    const int64_t token_stride = num_kv_heads * head_dim;  /* floats between two positions */
    #pragma omp for schedule(dynamic)
    for (int64_t job = 0; job < num_seqs * num_kv_heads; job++) {
        const int64_t s = job / num_kv_heads, kv_head = job % num_kv_heads;
        const int64_t num_keys = context_lens[s];
        const int64_t* table = block_tables + s * max_blocks;
        const float* qs = q + s * q_stride + kv_head * group * head_dim;  /* [group, D] */
        float* os = out + s * out_stride + kv_head * group * head_dim;
        float* scores = malloc(sizeof(float) * group * num_keys);  /* [group, num_keys] */
        if (scores == NULL) { *failed = 1; continue; }
#define KEY_ROW(pos) (k_cache + (table[(pos) / block_size] * block_size + (pos) % block_size) \
                              * token_stride + kv_head * head_dim)
        int64_t pos = 0;
        /* Four keys at a time (four independent FMA chains), each scored against every query head
         * of the group while its rows are in L1. */
        for (; pos + 4 <= num_keys && head_dim % 8 == 0; pos += 4) {
            const float *k0 = KEY_ROW(pos), *k1 = KEY_ROW(pos + 1);
            const float *k2 = KEY_ROW(pos + 2), *k3 = KEY_ROW(pos + 3);
            for (int64_t g = 0; g < group; g++) {
                const float* qg = qs + g * head_dim;
                __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
                for (int64_t i = 0; i < head_dim; i += 8) {
                    const __m256 qv = _mm256_loadu_ps(qg + i);
                    a0 = _mm256_fmadd_ps(_mm256_loadu_ps(k0 + i), qv, a0);
                    a1 = _mm256_fmadd_ps(_mm256_loadu_ps(k1 + i), qv, a1);
                    a2 = _mm256_fmadd_ps(_mm256_loadu_ps(k2 + i), qv, a2);
                    a3 = _mm256_fmadd_ps(_mm256_loadu_ps(k3 + i), qv, a3);
                }
                float* row = scores + g * num_keys + pos;
                row[0] = hsum(a0) * scale;
                row[1] = hsum(a1) * scale;
                row[2] = hsum(a2) * scale;
                row[3] = hsum(a3) * scale;
            }
        }
        for (; pos < num_keys; pos++) {
            const float* k = KEY_ROW(pos);
            for (int64_t g = 0; g < group; g++)
                scores[g * num_keys + pos] = dot(k, qs + g * head_dim, head_dim) * scale;
        }
#undef KEY_ROW
        for (int64_t g = 0; g < group; g++) softmax(scores + g * num_keys, num_keys);
        if (head_dim % 8 == 0 && head_dim <= 128) {
            /* out_g = sum over keys of p_g[pos] * V[pos], accumulated in registers. */
            for (int64_t g = 0; g < group; g++) {
                const float* p = scores + g * num_keys;
                __m256 acc[16];
                const int64_t n_vec = head_dim / 8;
                for (int64_t j = 0; j < n_vec; j++) acc[j] = _mm256_setzero_ps();
                for (int64_t pos = 0; pos < num_keys; pos++) {
                    const float* v = v_cache + (table[pos / block_size] * block_size
                                                + pos % block_size) * token_stride
                                     + kv_head * head_dim;
                    const __m256 pv = _mm256_set1_ps(p[pos]);
                    for (int64_t j = 0; j < n_vec; j++)
                        acc[j] = _mm256_fmadd_ps(pv, _mm256_loadu_ps(v + 8 * j), acc[j]);
                }
                for (int64_t j = 0; j < n_vec; j++) _mm256_storeu_ps(os + g * head_dim + 8 * j, acc[j]);
            }
        } else {
            for (int64_t d = 0; d < group * head_dim; d++) os[d] = 0.0f;
            for (int64_t pos = 0; pos < num_keys; pos++) {
                const float* v = v_cache + (table[pos / block_size] * block_size + pos % block_size)
                                 * token_stride + kv_head * head_dim;
                for (int64_t g = 0; g < group; g++) {
                    const float p = scores[g * num_keys + pos];
                    float* o = os + g * head_dim;
                    for (int64_t d = 0; d < head_dim; d++) o[d] += p * v[d];
                }
            }
        }
        free(scores);
    }
}

/* residual, delta, out: [rows, dim]; weight: [dim]. If delta is not NULL, residual += delta first
 * (in place); then out = residual / sqrt(mean(residual^2) + eps) * weight. */
static void rms_norm_rows(float* residual, const float* delta, const float* weight, float* out,
                          int64_t rows, int64_t dim, float eps) {
    #pragma omp for schedule(static)
    for (int64_t r = 0; r < rows; r++) {
        float* x = residual + r * dim;
        const float* d = delta ? delta + r * dim : NULL;
        float* o = out + r * dim;
        __m256 acc = _mm256_setzero_ps();
        int64_t i = 0;
        for (; i + 8 <= dim; i += 8) {
            __m256 v = _mm256_loadu_ps(x + i);
            if (d) {
                v = _mm256_add_ps(v, _mm256_loadu_ps(d + i));
                _mm256_storeu_ps(x + i, v);
            }
            acc = _mm256_fmadd_ps(v, v, acc);
        }
        float sum_sq = hsum(acc);
        for (; i < dim; i++) {
            if (d) x[i] += d[i];
            sum_sq += x[i] * x[i];
        }
        const float inv_rms = 1.0f / sqrtf(sum_sq / (float)dim + eps);
        for (i = 0; i < dim; i++) o[i] = weight[i] * (x[i] * inv_rms);
    }
}

/* qkv: [num_tokens, (num_heads + 2 num_kv_heads) head_dim], q heads, then k, then v. Rotates the q
 * and k heads in place (rotate-half: x cos + roll(x, D/2) sin, sin carrying the sign; cos, sin:
 * [num_tokens, head_dim]) and copies each token's k and v into its slot of the pool
 * ([num_slots, num_kv_heads head_dim]). head_dim <= 256. */
static void rope_store_kv(float* qkv, const float* cos, const float* sin, float* k_cache,
                          float* v_cache, const int64_t* slots, int64_t num_tokens,
                          int64_t num_heads, int64_t num_kv_heads, int64_t head_dim) {
    const int64_t kv_size = num_kv_heads * head_dim, half = head_dim / 2;
    const int64_t width = (num_heads + 2 * num_kv_heads) * head_dim;
    #pragma omp for schedule(static)
    for (int64_t t = 0; t < num_tokens; t++) {
        float* row = qkv + t * width;
        const float *c = cos + t * head_dim, *s = sin + t * head_dim;
        for (int64_t h = 0; h < num_heads + num_kv_heads; h++) {
            float* x = row + h * head_dim;
            float rotated[256];
            for (int64_t i = 0; i < head_dim; i++)
                rotated[i] = x[i] * c[i] + x[(i + half) % head_dim] * s[i];
            memcpy(x, rotated, sizeof(float) * head_dim);
        }
        const float* k = row + num_heads * head_dim;
        memcpy(k_cache + slots[t] * kv_size, k, sizeof(float) * kv_size);
        memcpy(v_cache + slots[t] * kv_size, k + kv_size, sizeof(float) * kv_size);
    }
}

/* gate_up: [num_tokens, 2 n], gate then up; gate_up[:, :n] = silu(gate) * up, in place. */
static void silu_mul(float* gate_up, int64_t num_tokens, int64_t n) {
    #pragma omp for schedule(static)
    for (int64_t t = 0; t < num_tokens; t++) {
        float* g = gate_up + t * 2 * n;
        const float* u = g + n;
        int64_t i = 0;
        for (; i + 8 <= n; i += 8) {
            const __m256 x = _mm256_loadu_ps(g + i);
            const __m256 e = exp8(_mm256_sub_ps(_mm256_setzero_ps(), x));
            const __m256 silu = _mm256_div_ps(x, _mm256_add_ps(_mm256_set1_ps(1.0f), e));
            _mm256_storeu_ps(g + i, _mm256_mul_ps(silu, _mm256_loadu_ps(u + i)));
        }
        for (; i < n; i++) g[i] = g[i] / (1.0f + expf(-g[i])) * u[i];
    }
}

/* ---- exported entry points ------------------------------------------------------------------- */

/* y [n_out] = W [n_out, n_in] x [n_in] (+ bias): the single-token linear layer. */
void baton_gemv_f32(const float* w, const float* x, const float* bias, float* y,
                    int64_t n_out, int64_t n_in, int num_threads) {
    #pragma omp parallel num_threads(num_threads)
    gemv(w, x, bias, y, n_out, n_in, 0);
}

/* X: [M, K], W: [N, K], bias: [N] or NULL, Y: [M, N]; K % 8 == 0. */
void baton_gemm_small_f32(const float* X, const float* W, const float* bias, float* Y,
                          int64_t M, int64_t N, int64_t K, int num_threads) {
    #pragma omp parallel num_threads(num_threads)
    gemm_small(X, K, W, bias, Y, M, N, K, 0);
}

/* q, out: [num_seqs, num_heads, head_dim]; the rest as in attention(). 0, or -1 when out of
 * memory. */
int baton_decode_attention_f32(const float* q, const float* k_cache, const float* v_cache,
                               const int64_t* block_tables, const int64_t* context_lens,
                               float* out, int64_t num_seqs, int64_t num_heads,
                               int64_t num_kv_heads, int64_t head_dim, int64_t block_size,
                               int64_t max_blocks, float scale, int num_threads) {
    int failed = 0;
    #pragma omp parallel num_threads(num_threads)
    attention(q, num_heads * head_dim, k_cache, v_cache, block_tables, context_lens, out,
              num_heads * head_dim, num_seqs, num_heads, num_kv_heads, head_dim, block_size,
              max_blocks, scale, &failed);
    return failed ? -1 : 0;
}

void baton_add_rms_norm_f32(float* residual, const float* delta, const float* weight, float* out,
                            int64_t rows, int64_t dim, float eps, int num_threads) {
    #pragma omp parallel num_threads(rows > 1 ? num_threads : 1)
    rms_norm_rows(residual, delta, weight, out, rows, dim, eps);
}

/* k, v: [num_tokens, row] (row = num_kv_heads * head_dim); caches: [num_slots, row]. */
void baton_store_kv_f32(const float* k, const float* v, float* k_cache, float* v_cache,
                        const int64_t* slots, int64_t num_tokens, int64_t row) {
    for (int64_t t = 0; t < num_tokens; t++) {
        memcpy(k_cache + slots[t] * row, k + t * row, sizeof(float) * row);
        memcpy(v_cache + slots[t] * row, v + t * row, sizeof(float) * row);
    }
}

/* One Llama decoder layer's weights (engine/models/llama.py; biases may be NULL) and its pool. */
typedef struct {
    const float *input_norm, *qkv_weight, *qkv_bias, *o_weight, *o_bias, *post_norm,
                *gate_up_weight, *down_weight;
    float *k_cache, *v_cache;  /* [num_blocks, block_size, num_kv_heads, head_dim] */
} BatonDecoderLayer;

/* A batch of sequences with one new token each (1 to 64), and scratch space for a layer. */
typedef struct {
    int64_t num_seqs, dim, num_heads, num_kv_heads, head_dim, intermediate, block_size, max_blocks;
    float eps, scale;
    const float *cos, *sin;  /* [num_seqs, head_dim] */
    const int64_t *slots, *block_tables, *context_lens;  /* [num_seqs], [num_seqs, max_blocks] */
    float *normed, *qkv, *attn, *gate_up;  /* [num_seqs, dim / qkv width / q size / 2 inter] */
} BatonDecodeBatch;

static void linear(const float* X, int64_t ldx, const float* W, const float* bias, float* Y,
                   int64_t M, int64_t N, int64_t K, int accumulate) {
    if (M == 1) gemv(W, X, bias, Y, N, K, accumulate);
    else gemm_small(X, ldx, W, bias, Y, M, N, K, accumulate);
}

/* residual [num_seqs, dim] += the layer's attention and MLP outputs, as DecoderLayer.forward
 * computes them, in one parallel region: norm, qkv, rope + KV store, attention, o_proj (added into
 * the residual), norm, gate_up, silu * up, down_proj (added). Needs dim, head_dim and intermediate
 * divisible by 8 and head_dim <= 128. 0, or -1 when out of memory. */
int baton_decode_layer_f32(const BatonDecoderLayer* L, const BatonDecodeBatch* b,
                           float* residual, int num_threads) {
    const int64_t B = b->num_seqs, dim = b->dim, D = b->head_dim;
    const int64_t q_size = b->num_heads * D, width = q_size + 2 * b->num_kv_heads * D;
    int failed = 0;
    #pragma omp parallel num_threads(num_threads)
    {
        rms_norm_rows(residual, NULL, L->input_norm, b->normed, B, dim, b->eps);
        linear(b->normed, dim, L->qkv_weight, L->qkv_bias, b->qkv, B, width, dim, 0);
        rope_store_kv(b->qkv, b->cos, b->sin, L->k_cache, L->v_cache, b->slots, B, b->num_heads,
                      b->num_kv_heads, D);
        attention(b->qkv, width, L->k_cache, L->v_cache, b->block_tables, b->context_lens,
                  b->attn, q_size, B, b->num_heads, b->num_kv_heads, D, b->block_size,
                  b->max_blocks, b->scale, &failed);
        linear(b->attn, q_size, L->o_weight, L->o_bias, residual, B, dim, q_size, 1);
        rms_norm_rows(residual, NULL, L->post_norm, b->normed, B, dim, b->eps);
        linear(b->normed, dim, L->gate_up_weight, NULL, b->gate_up, B, 2 * b->intermediate, dim, 0);
        silu_mul(b->gate_up, B, b->intermediate);
        linear(b->gate_up, 2 * b->intermediate, L->down_weight, NULL, residual, B, dim,
               b->intermediate, 1);
    }
    return failed ? -1 : 0;
}
