/* fedmq device kernels for WebAssembly: an MLP's local training step.
 *
 * Built freestanding for wasm32 with 128-bit SIMD (no libc, no imports; see
 * scripts/build-wasm.sh). The module owns its linear memory and a bump allocator on top of it;
 * the host copies tensors in and out through the pointers the exports return.
 *
 * Layouts follow PyTorch, so a state dict maps onto one flat buffer in order:
 *   weight (out, in) row-major, then bias (out), layer after layer.
 * The training step is what learning/train.py does per batch with torch.optim.SGD:
 *   loss = mean cross-entropy; g = grad + weight_decay * p + proximal_mu * (p - anchor);
 *   v = momentum * v + g; p = p - lr * v.
 * (A fresh optimizer per round starts v at g; v = 0 followed by v = m*0 + g is the same.)
 *
 * The three matrix products of a step (forward, input gradient, weight gradient) are one
 * cache-blocked GEMM: panels of KC x NC of the right operand stay in cache while a register
 * tile of MR rows x 2 vectors accumulates over them. Each output is summed over k in order,
 * as the plain loops did, so blocking changes no result. mlp_train_steps runs many steps
 * (a local epoch) per call, so that the host's per-call costs (and wasmtime's runaway guard
 * set up per call) are paid once per call, not per step. exp and log for the softmax are our
 * own (there is no libm here) and run in double.
 *
 * The same source builds natively (benchmarks/wasm_step.py) with GCC/clang vector
 * extensions of the same width in place of wasm_simd128.h.
 */

#include <stdint.h>

#ifdef __wasm__
#define EXPORT(name) __attribute__((export_name(name)))
#else
#define EXPORT(name) __attribute__((visibility("default")))
#endif
#define PAGE 65536u
#define INLINE static inline __attribute__((always_inline))

/* ---- 128-bit float vectors ------------------------------------------------------------- */

#if defined(__wasm__)
#ifndef __wasm_simd128__
#error "build with -msimd128 (wasmtime and every current browser run WebAssembly SIMD)"
#endif
#include <wasm_simd128.h>
#define VW 4
typedef v128_t vf;
INLINE vf vload(const float *p) { return wasm_v128_load(p); }
INLINE void vstore(float *p, vf v) { wasm_v128_store(p, v); }
INLINE vf vsplat(float x) { return wasm_f32x4_splat(x); }
INLINE vf vadd(vf a, vf b) { return wasm_f32x4_add(a, b); }
INLINE vf vsub(vf a, vf b) { return wasm_f32x4_sub(a, b); }
INLINE vf vmul(vf a, vf b) { return wasm_f32x4_mul(a, b); }
#else /* native: the same width through vector extensions (VW 8 for a 256-bit comparison) */
#ifndef VW
#define VW 4
#endif
typedef float vf __attribute__((vector_size(VW * 4)));
INLINE vf vload(const float *p) {
  vf v;
  __builtin_memcpy(&v, p, sizeof v);
  return v;
}
INLINE void vstore(float *p, vf v) { __builtin_memcpy(p, &v, sizeof v); }
INLINE vf vsplat(float x) {
  vf v;
  for (int i = 0; i < VW; ++i) v[i] = x;
  return v;
}
INLINE vf vadd(vf a, vf b) { return a + b; }
INLINE vf vsub(vf a, vf b) { return a - b; }
INLINE vf vmul(vf a, vf b) { return a * b; }
#endif

/* ---- memory: a bump allocator over the module's own linear memory ---------------------- */

#ifdef __wasm__
extern unsigned char __heap_base;
#define HEAP_BASE ((uintptr_t)&__heap_base)
#define HEAP_END() (__builtin_wasm_memory_size(0) * PAGE)
#define MEMORY_GROW(pages) (__builtin_wasm_memory_grow(0, pages) != (uintptr_t)-1)
#else /* a native build, for benchmarks/wasm_step.py's "same C, native" column */
static unsigned char arena[1u << 27] __attribute__((aligned(64)));
#define HEAP_BASE ((uintptr_t)arena)
#define HEAP_END() ((uintptr_t)arena + sizeof arena)
#define MEMORY_GROW(pages) ((void)(pages), 0)
#endif

static uintptr_t heap_top = 0;

EXPORT("fm_reset") void fm_reset(void) { heap_top = HEAP_BASE; }

/* 16-byte aligned block of `bytes`, zeroed; 0 when memory cannot grow (the host's cap). */
EXPORT("fm_alloc") uintptr_t fm_alloc(uint32_t bytes) {
  if (heap_top == 0) fm_reset();
  uintptr_t start = (heap_top + 15u) & ~(uintptr_t)15u;
  uintptr_t end = start + bytes;
  if (end < start) return 0;
  const uintptr_t have = HEAP_END();
  if (end > have) {
    uintptr_t pages = (end - have + PAGE - 1) / PAGE;
    if (!MEMORY_GROW(pages)) return 0;
  }
  heap_top = end;
  __builtin_memset((void *)start, 0, bytes);
  return start;
}

/* ---- exp and log in double (range reduction + polynomials) ---------------------------- */

static double fm_exp(double x) {
  if (x < -745.0) return 0.0;
  if (x > 709.0) x = 709.0;
  const double ln2 = 0.69314718055994530942;
  double kf = __builtin_floor(x / ln2 + 0.5);
  double r = x - kf * ln2; /* |r| <= ln2 / 2 */
  /* Taylor to r^14/14! (the next term is below 4e-18 for |r| <= 0.35), Horner form. */
  static const double inv_fact[15] = {
      1.0, 1.0, 1.0 / 2, 1.0 / 6, 1.0 / 24, 1.0 / 120, 1.0 / 720, 1.0 / 5040,
      1.0 / 40320, 1.0 / 362880, 1.0 / 3628800, 1.0 / 39916800, 1.0 / 479001600,
      1.0 / 6227020800.0, 1.0 / 87178291200.0};
  double sum = inv_fact[14];
  for (int i = 13; i >= 0; --i) sum = sum * r + inv_fact[i];
  int64_t k = (int64_t)kf;
  /* 2^k by building the double's exponent; split so that k near -1022 stays normal. */
  double scale = 1.0;
  while (k < -1000) { scale *= 0x1p-1000; k += 1000; }
  union { double d; uint64_t u; } two_k = {.u = (uint64_t)(k + 1023) << 52};
  return sum * two_k.d * scale;
}

static double fm_log(double x) { /* x > 0 */
  union { double d; uint64_t u; } v = {.d = x};
  int64_t e = (int64_t)((v.u >> 52) & 0x7ff) - 1023;
  v.u = (v.u & 0x000fffffffffffffull) | 0x3ff0000000000000ull; /* mantissa in [1, 2) */
  double m = v.d;
  if (m > 1.4142135623730951) { m *= 0.5; e += 1; }
  double s = (m - 1.0) / (m + 1.0), s2 = s * s; /* |s| <= 0.172 */
  /* atanh series: sum of s^(2j+1) / (2j+1), j < 16, Horner in s^2. */
  double sum = 1.0 / 31;
  for (int i = 29; i >= 1; i -= 2) sum = sum * s2 + 1.0 / i;
  return 2.0 * s * sum + (double)e * 0.69314718055994530942;
}

/* ---- GEMM: C (M, N) = [C +] A (M, K) B (K, N) ------------------------------------------ */

/* A[m, k] is a[m * ars + k * aks] (any layout, so that A can be a transpose in place); B
 * and C are row-major with row strides ldb and ldc. */
#define MR 4        /* rows of C per register tile */
#define NR (2 * VW) /* columns of C per register tile: two vectors */
#define KC 128      /* k per panel: a KC x NC panel of B (<= 128 KiB) stays in L2 */
#define NC 256

/* One tile of C: rows [0, mr) x vectors [0, nv) from k = 0..kc. mr and nv are constants
 * where it is inlined, so the accumulators live in registers. */
INLINE void tile(const int mr, const int nv, int kc, const float *restrict a, int ars, int aks,
                 const float *restrict b, int ldb, float *restrict c, int ldc, int load) {
  vf acc[MR][2];
  for (int r = 0; r < mr; ++r)
    for (int v = 0; v < nv; ++v) acc[r][v] = load ? vload(c + r * ldc + v * VW) : vsplat(0.0f);
  for (int k = 0; k < kc; ++k) {
    const float *bk = b + k * ldb;
    vf bv[2];
    for (int v = 0; v < nv; ++v) bv[v] = vload(bk + v * VW);
    for (int r = 0; r < mr; ++r) {
      const vf av = vsplat(a[r * ars + k * aks]);
      for (int v = 0; v < nv; ++v) acc[r][v] = vadd(acc[r][v], vmul(av, bv[v]));
    }
  }
  for (int r = 0; r < mr; ++r)
    for (int v = 0; v < nv; ++v) vstore(c + r * ldc + v * VW, acc[r][v]);
}

/* Columns past the last whole vector, one at a time, in the same order of k. */
static void tile_tail(int mr, int nr, int kc, const float *restrict a, int ars, int aks,
                      const float *restrict b, int ldb, float *restrict c, int ldc, int load) {
  for (int r = 0; r < mr; ++r)
    for (int j = 0; j < nr; ++j) {
      float s = load ? c[r * ldc + j] : 0.0f;
      for (int k = 0; k < kc; ++k) s += a[r * ars + k * aks] * b[k * ldb + j];
      c[r * ldc + j] = s;
    }
}

#define TILE_ROWS(mr)                                                                       \
  do {                                                                                      \
    int j = 0;                                                                              \
    for (; j + NR <= nc; j += NR) tile(mr, 2, kc, ap, ars, aks, bp + j, ldb, cp + j, ldc, load); \
    if (j + VW <= nc) {                                                                     \
      tile(mr, 1, kc, ap, ars, aks, bp + j, ldb, cp + j, ldc, load);                        \
      j += VW;                                                                              \
    }                                                                                       \
    if (j < nc) tile_tail(mr, nc - j, kc, ap, ars, aks, bp + j, ldb, cp + j, ldc, load);    \
  } while (0)

static void gemm(int M, int N, int K, const float *restrict a, int ars, int aks,
                 const float *restrict b, int ldb, float *restrict c, int ldc, int accumulate) {
  for (int k0 = 0; k0 < K; k0 += KC) {
    const int kc = K - k0 < KC ? K - k0 : KC;
    const int load = accumulate || k0 > 0;
    for (int j0 = 0; j0 < N; j0 += NC) {
      const int nc = N - j0 < NC ? N - j0 : NC;
      const float *bp = b + k0 * ldb + j0;
      int i = 0;
      for (; i + MR <= M; i += MR) {
        const float *ap = a + i * ars + k0 * aks;
        float *cp = c + i * ldc + j0;
        TILE_ROWS(MR);
      }
      const float *ap = a + i * ars + k0 * aks;
      float *cp = c + i * ldc + j0;
      switch (M - i) {
        case 3: TILE_ROWS(3); break;
        case 2: TILE_ROWS(2); break;
        case 1: TILE_ROWS(1); break;
        default: break;
      }
    }
  }
}

/* ---- kernels --------------------------------------------------------------------------- */

/* dst (cols, rows) = src (rows, cols).T, in square blocks so both sides stay in cache. */
static void transpose(const float *restrict src, float *restrict dst, int rows, int cols) {
  enum { B = 16 };
  for (int r0 = 0; r0 < rows; r0 += B)
    for (int c0 = 0; c0 < cols; c0 += B) {
      const int r1 = r0 + B < rows ? r0 + B : rows, c1 = c0 + B < cols ? c0 + B : cols;
      for (int r = r0; r < r1; ++r)
        for (int q = c0; q < c1; ++q) dst[q * rows + r] = src[r * cols + q];
    }
}

/* y (n, out) = x (n, in) @ w.T + b, with w (out, in); wt is scratch (in, out). */
EXPORT("dense_forward")
void dense_forward(const float *restrict x, const float *restrict w, const float *restrict b,
                   float *restrict y, float *restrict wt, int n, int in, int out) {
  transpose(w, wt, out, in);
  for (int i = 0; i < n; ++i)
    for (int o = 0; o < out; ++o) y[i * out + o] = b[o];
  gemm(n, out, in, x, in, 1, wt, out, y, out, 1);
}

/* From dy (n, out): gw (out, in) = dy.T @ x, gb (out) = sum dy, dx (n, in) = dy @ w
 * (dx may be 0: the first layer needs no input gradient). */
EXPORT("dense_backward")
void dense_backward(const float *restrict x, const float *restrict w, const float *restrict dy,
                    float *restrict gw, float *restrict gb, float *restrict dx, int n, int in,
                    int out) {
  for (int o = 0; o < out; ++o) gb[o] = 0.0f;
  for (int i = 0; i < n; ++i)
    for (int o = 0; o < out; ++o) gb[o] += dy[i * out + o];
  gemm(out, in, n, dy, 1, out, x, in, gw, in, 0); /* A = dy.T, read in place */
  if (dx) gemm(n, in, out, dy, out, 1, w, in, dx, in, 0);
}

EXPORT("relu_forward") void relu_forward(float *restrict y, int count) {
  for (int j = 0; j < count; ++j) y[j] = y[j] > 0.0f ? y[j] : 0.0f;
}

/* dy *= (y > 0), y being ReLU's output (y > 0 exactly where its input was). */
EXPORT("relu_backward")
void relu_backward(const float *restrict y, float *restrict dy, int count) {
  for (int j = 0; j < count; ++j) dy[j] = y[j] > 0.0f ? dy[j] : 0.0f;
}

/* Mean cross-entropy of logits z (n, c) against labels; dz = (softmax(z) - onehot) / n.
 * Stable: each row is shifted by its max. Writes the number of rows whose argmax (first
 * maximum, as torch) equals the label to *correct. Returns the mean loss. */
EXPORT("softmax_xent")
double softmax_xent(const float *restrict z, const int32_t *restrict labels, float *restrict dz,
                    int n, int c, int32_t *restrict correct) {
  double total = 0.0;
  int32_t hits = 0;
  for (int i = 0; i < n; ++i) {
    const float *restrict zi = z + i * c;
    float *restrict dzi = dz + i * c;
    int arg = 0;
    for (int j = 1; j < c; ++j)
      if (zi[j] > zi[arg]) arg = j;
    const double m = zi[arg];
    double sum = 0.0;
    for (int j = 0; j < c; ++j) sum += fm_exp((double)zi[j] - m);
    const int y = labels[i];
    total += m + fm_log(sum) - (double)zi[y];
    hits += arg == y;
    const double inv = 1.0 / sum;
    for (int j = 0; j < c; ++j) {
      const double p = fm_exp((double)zi[j] - m) * inv;
      dzi[j] = (float)((p - (j == y ? 1.0 : 0.0)) / n);
    }
  }
  *correct = hits;
  return total / n;
}

/* torch.optim.SGD's update, with the FedProx term when anchor is given. */
EXPORT("sgd_momentum")
void sgd_momentum(float *restrict p, const float *restrict g, float *restrict v,
                  const float *restrict anchor, int count, float lr, float momentum,
                  float weight_decay, float proximal_mu) {
  const vf lr_v = vsplat(lr), mom_v = vsplat(momentum), wd_v = vsplat(weight_decay),
           mu_v = vsplat(proximal_mu);
  int j = 0;
  for (; j + VW <= count; j += VW) {
    const vf pj = vload(p + j);
    vf gj = vload(g + j);
    if (anchor) gj = vadd(gj, vmul(mu_v, vsub(pj, vload(anchor + j))));
    if (weight_decay != 0.0f) gj = vadd(gj, vmul(wd_v, pj));
    const vf vj = momentum != 0.0f ? vadd(vmul(mom_v, vload(v + j)), gj) : gj;
    vstore(v + j, vj);
    vstore(p + j, vsub(pj, vmul(lr_v, vj)));
  }
  for (; j < count; ++j) {
    float gj = g[j];
    if (anchor) gj += proximal_mu * (p[j] - anchor[j]);
    if (weight_decay != 0.0f) gj += weight_decay * p[j];
    const float vj = momentum != 0.0f ? momentum * v[j] + gj : gj;
    v[j] = vj;
    p[j] -= lr * vj;
  }
}

/* ---- the MLP: Linear/ReLU stack, state held in module memory -------------------------- */

#define MAX_LAYERS 16

typedef struct {
  int32_t layers, max_batch, num_params, max_width;
  int32_t widths[MAX_LAYERS + 1];
  int32_t correct;
  float *params, *grads, *velocity, *anchor, *x;
  int32_t *labels;
  float *acts[MAX_LAYERS]; /* output of layer l (after ReLU but for the last) */
  float *delta_a, *delta_b, *wt;
} mlp_t;

static uintptr_t falloc(uint32_t floats) { return fm_alloc(floats * 4u); }

/* A model of `layers` Linear layers with widths[0..layers]; 0 when out of memory. */
EXPORT("mlp_create") uintptr_t mlp_create(int layers, const int32_t *widths, int max_batch) {
  if (layers < 1 || layers > MAX_LAYERS || max_batch < 1) return 0;
  mlp_t *m = (mlp_t *)fm_alloc(sizeof(mlp_t));
  if (!m) return 0;
  m->layers = layers;
  m->max_batch = max_batch;
  int32_t params = 0, widest = 0, widest_w = 0;
  for (int l = 0; l <= layers; ++l) {
    if (widths[l] < 1) return 0;
    m->widths[l] = widths[l];
    if (widths[l] > widest) widest = widths[l];
  }
  for (int l = 0; l < layers; ++l) {
    params += widths[l + 1] * widths[l] + widths[l + 1];
    if (widths[l + 1] * widths[l] > widest_w) widest_w = widths[l + 1] * widths[l];
  }
  m->num_params = params;
  m->max_width = widest;
  if (!(m->params = (float *)falloc(params)) || !(m->grads = (float *)falloc(params)) ||
      !(m->velocity = (float *)falloc(params)) || !(m->anchor = (float *)falloc(params)) ||
      !(m->x = (float *)falloc(max_batch * widths[0])) ||
      !(m->labels = (int32_t *)falloc(max_batch)) ||
      !(m->delta_a = (float *)falloc(max_batch * widest)) ||
      !(m->delta_b = (float *)falloc(max_batch * widest)) || !(m->wt = (float *)falloc(widest_w)))
    return 0;
  for (int l = 0; l < layers; ++l)
    if (!(m->acts[l] = (float *)falloc(max_batch * widths[l + 1]))) return 0;
  return (uintptr_t)m;
}

EXPORT("mlp_num_params") int32_t mlp_num_params(const mlp_t *m) { return m->num_params; }
EXPORT("mlp_params") uintptr_t mlp_params(const mlp_t *m) { return (uintptr_t)m->params; }
EXPORT("mlp_grads") uintptr_t mlp_grads(const mlp_t *m) { return (uintptr_t)m->grads; }
EXPORT("mlp_velocity") uintptr_t mlp_velocity(const mlp_t *m) { return (uintptr_t)m->velocity; }
EXPORT("mlp_anchor") uintptr_t mlp_anchor(const mlp_t *m) { return (uintptr_t)m->anchor; }
EXPORT("mlp_x") uintptr_t mlp_x(const mlp_t *m) { return (uintptr_t)m->x; }
EXPORT("mlp_labels") uintptr_t mlp_labels(const mlp_t *m) { return (uintptr_t)m->labels; }
EXPORT("mlp_correct") int32_t mlp_correct(const mlp_t *m) { return m->correct; }

/* Zeroes the momentum buffer: a fresh optimizer, as every round of train_local. */
EXPORT("mlp_reset_velocity") void mlp_reset_velocity(mlp_t *m) {
  __builtin_memset(m->velocity, 0, (unsigned long)m->num_params * 4u);
}

/* Forward and backward over the first n rows of x/labels: fills grads, returns the loss
 * (-1 for a batch size out of range or a label out of 0..classes-1). */
EXPORT("mlp_forward_backward") double mlp_forward_backward(mlp_t *m, int n) {
  if (n < 1 || n > m->max_batch) return -1.0;
  const int32_t *w = m->widths;
  for (int i = 0; i < n; ++i)
    if (m->labels[i] < 0 || m->labels[i] >= w[m->layers]) return -1.0;
  const float *in = m->x;
  float *p = m->params;
  for (int l = 0; l < m->layers; ++l) {
    dense_forward(in, p, p + w[l + 1] * w[l], m->acts[l], m->wt, n, w[l], w[l + 1]);
    if (l + 1 < m->layers) relu_forward(m->acts[l], n * w[l + 1]);
    in = m->acts[l];
    p += w[l + 1] * w[l] + w[l + 1];
  }
  const int last = m->layers - 1;
  float *dy = m->delta_a, *dx = m->delta_b;
  const double loss = softmax_xent(m->acts[last], m->labels, dy, n, w[m->layers], &m->correct);
  float *gp = m->grads + m->num_params;
  p = m->params + m->num_params;
  for (int l = last; l >= 0; --l) {
    const int size = w[l + 1] * w[l] + w[l + 1];
    p -= size;
    gp -= size;
    const float *x = l == 0 ? m->x : m->acts[l - 1];
    dense_backward(x, p, dy, gp, gp + w[l + 1] * w[l], l == 0 ? 0 : dx, n, w[l], w[l + 1]);
    if (l > 0) {
      relu_backward(m->acts[l - 1], dx, n * w[l]);
      float *t = dy;
      dy = dx;
      dx = t;
    }
  }
  return loss;
}

/* One SGD step on the first n rows; use_anchor: add the FedProx term towards anchor. */
EXPORT("mlp_train_step")
double mlp_train_step(mlp_t *m, int n, float lr, float momentum, float weight_decay,
                      float proximal_mu, int use_anchor) {
  const double loss = mlp_forward_backward(m, n);
  if (loss < 0.0) return loss;
  sgd_momentum(m->params, m->grads, m->velocity, use_anchor ? m->anchor : 0, m->num_params, lr,
               momentum, weight_decay, proximal_mu);
  return loss;
}

/* Several steps in one call: rows order[0..count) of a data set held in module memory
 * (data (rows, in), labels (rows)), `batch` at a time (the last batch may be shorter),
 * each gathered into the model's batch buffer and trained on as mlp_train_step. Returns
 * the sum over steps of loss x rows, and leaves the summed hits in mlp_correct; -1 when an
 * argument or an order index is out of range. */
EXPORT("mlp_train_steps")
double mlp_train_steps(mlp_t *m, const float *restrict data, const int32_t *restrict labels,
                       int rows, const int32_t *restrict order, int count, int batch,
                       float lr, float momentum, float weight_decay, float proximal_mu,
                       int use_anchor) {
  if (batch < 1 || batch > m->max_batch || count < 0 || rows < 0) return -1.0;
  for (int i = 0; i < count; ++i)
    if (order[i] < 0 || order[i] >= rows) return -1.0;
  const int in = m->widths[0];
  double loss_sum = 0.0;
  int32_t hits = 0;
  for (int start = 0; start < count; start += batch) {
    const int n = count - start < batch ? count - start : batch;
    for (int i = 0; i < n; ++i) {
      const int32_t r = order[start + i];
      __builtin_memcpy(m->x + i * in, data + (uintptr_t)r * in, (unsigned long)in * 4u);
      m->labels[i] = labels[r];
    }
    const double loss = mlp_train_step(m, n, lr, momentum, weight_decay, proximal_mu, use_anchor);
    if (loss < 0.0) return loss;
    loss_sum += loss * n;
    hits += m->correct;
  }
  m->correct = hits;
  return loss_sum;
}
