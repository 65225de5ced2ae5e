/* fedmq device kernels for WebAssembly: an MLP's local training step.
 *
 * Built freestanding for wasm32 (no libc, no imports; see scripts/build-wasm.sh). The module
 * owns its linear memory and a bump allocator on top of it; the host copies tensors in and
 * out through the pointers the exports return.
 *
 * Layouts follow PyTorch, so a state dict maps onto one flat buffer in order:
 *   weight (out, in) row-major, then bias (out), layer after layer.
 * The training step is what learning/train.py does per batch with torch.optim.SGD:
 *   loss = mean cross-entropy; g = grad + weight_decay * p + proximal_mu * (p - anchor);
 *   v = momentum * v + g; p = p - lr * v.
 * (A fresh optimizer per round starts v at g; v = 0 followed by v = m*0 + g is the same.)
 *
 * Matrix loops are written as axpy over contiguous rows (y[j] += a * x[j]) so clang can
 * vectorise them with simd128 without reassociating sums. exp and log for the softmax are
 * our own (there is no libm here) and run in double.
 */

#include <stdint.h>

#ifdef __wasm__
#define EXPORT(name) __attribute__((export_name(name)))
#else
#define EXPORT(name) __attribute__((visibility("default")))
#endif
#define PAGE 65536u

/* ---- memory: a bump allocator over the module's own linear memory ---------------------- */

#ifdef __wasm__
extern unsigned char __heap_base;
#define HEAP_BASE ((uintptr_t)&__heap_base)
#define HEAP_END() (__builtin_wasm_memory_size(0) * PAGE)
#define MEMORY_GROW(pages) (__builtin_wasm_memory_grow(0, pages) != (uintptr_t)-1)
#else /* a native build, for benchmarks/wasm_step.py's "same C, native" column */
static unsigned char arena[1u << 27] __attribute__((aligned(16)));
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
  double term = 1.0, sum = 1.0;
  for (int i = 1; i <= 17; ++i) { /* r^17/17! < 1e-17 for |r| < 0.35 */
    term *= r / i;
    sum += term;
  }
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
  double term = s, sum = 0.0;
  for (int i = 1; i <= 31; i += 2) {
    sum += term / i;
    term *= s2;
  }
  return 2.0 * sum + (double)e * 0.69314718055994530942;
}

/* ---- kernels --------------------------------------------------------------------------- */

/* y (n, out) = x (n, in) @ w.T + b, with w (out, in); wt is scratch (in, out). */
EXPORT("dense_forward")
void dense_forward(const float *restrict x, const float *restrict w, const float *restrict b,
                   float *restrict y, float *restrict wt, int n, int in, int out) {
  for (int o = 0; o < out; ++o)
    for (int k = 0; k < in; ++k) wt[k * out + o] = w[o * in + k];
  for (int i = 0; i < n; ++i) {
    float *restrict yi = y + i * out;
    for (int o = 0; o < out; ++o) yi[o] = b[o];
    for (int k = 0; k < in; ++k) {
      const float a = x[i * in + k];
      const float *restrict wk = wt + k * out;
      for (int o = 0; o < out; ++o) yi[o] += a * wk[o];
    }
  }
}

/* From dy (n, out): gw (out, in) += dy.T @ x, gb (out) += sum dy, dx (n, in) = dy @ w
 * (dx may be 0: the first layer needs no input gradient). gw and gb must start zeroed. */
EXPORT("dense_backward")
void dense_backward(const float *restrict x, const float *restrict w, const float *restrict dy,
                    float *restrict gw, float *restrict gb, float *restrict dx, int n, int in,
                    int out) {
  for (int i = 0; i < n; ++i) {
    const float *restrict xi = x + i * in;
    const float *restrict dyi = dy + i * out;
    for (int o = 0; o < out; ++o) {
      const float d = dyi[o];
      gb[o] += d;
      float *restrict gwo = gw + o * in;
      for (int k = 0; k < in; ++k) gwo[k] += d * xi[k];
    }
  }
  if (!dx) return;
  for (int i = 0; i < n; ++i) {
    float *restrict dxi = dx + i * in;
    for (int k = 0; k < in; ++k) dxi[k] = 0.0f;
    const float *restrict dyi = dy + i * out;
    for (int o = 0; o < out; ++o) {
      const float d = dyi[o];
      const float *restrict wo = w + o * in;
      for (int k = 0; k < in; ++k) dxi[k] += d * wo[k];
    }
  }
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
    for (int j = 0; j < c; ++j) {
      const double p = fm_exp((double)zi[j] - m) / sum;
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
  for (int j = 0; j < count; ++j) {
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

/* Forward and backward over the first n rows of x/labels: fills grads, returns the loss. */
EXPORT("mlp_forward_backward") double mlp_forward_backward(mlp_t *m, int n) {
  if (n < 1 || n > m->max_batch) return -1.0;
  const int32_t *w = m->widths;
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
  __builtin_memset(m->grads, 0, (unsigned long)m->num_params * 4u);
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
