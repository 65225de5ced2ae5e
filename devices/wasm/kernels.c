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
#define VLANE(v, i) wasm_i32x4_shuffle(v, v, i, i, i, i) /* lane i in all four */
#define VSHUF(a, b, i, j, k, l) wasm_i32x4_shuffle(a, b, i, j, k, l) /* lanes of a then b */
/* d where y > 0, else +0 (also where y is NaN, as the scalar y > 0 ? d : 0) */
INLINE vf vwhere_pos(vf y, vf d) { return wasm_v128_and(d, wasm_f32x4_gt(y, vsplat(0.0f))); }
#else /* native: the same width through GCC/clang vector extensions */
#define VW 4
typedef float vf __attribute__((vector_size(16)));
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
#define VLANE(v, i) __builtin_shufflevector(v, v, i, i, i, i)
#define VSHUF(a, b, i, j, k, l) __builtin_shufflevector(a, b, i, j, k, l)
typedef int32_t vi __attribute__((vector_size(16)));
INLINE vf vwhere_pos(vf y, vf d) { return (vf)((vi)d & (vi)(y > vsplat(0.0f))); }
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
  if (k < -1000) { /* x >= -745 bounds k below by -1075: one split is enough */
    scale = 0x1p-1000;
    k += 1000;
  }
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

/* A[m, k] is a[m * ams + k * aks] and B[k, n] is b[k * bks + n * bns] (any layout, so that
 * transposes are read in place); C is row-major with row stride ldc.
 * Blocking as in GotoBLAS: for each KC x NC panel of B, a register tile of MR x NR of C
 * accumulates over the panel's k while the panel stays in cache. The tile reads A's MR
 * rows at one k as one vector and B's NR columns at one k as two: operands that are not
 * laid out so (a transposed A or B, or a ragged edge) are first packed into that layout,
 * padded with zeros; an edge tile of C goes through a scratch tile. Each C element is
 * summed over k in order, as a plain loop would, so blocking changes no result. */
#define MR 4        /* rows of C per register tile: one vector of A */
#define NR (2 * VW) /* columns of C per register tile: two vectors of B */
#define KC 128
#define NC 256

static float packed_b[KC * NC] __attribute__((aligned(16)));
static float packed_a[KC * MR] __attribute__((aligned(16)));

/* Rows r0..r3 (4 floats each) written as columns: dst[i * ld + j] = r_j[i]. */
INLINE void transpose4(vf r0, vf r1, vf r2, vf r3, float *dst, int ld) {
  const vf t0 = VSHUF(r0, r1, 0, 4, 1, 5), t1 = VSHUF(r0, r1, 2, 6, 3, 7);
  const vf t2 = VSHUF(r2, r3, 0, 4, 1, 5), t3 = VSHUF(r2, r3, 2, 6, 3, 7);
  vstore(dst, VSHUF(t0, t2, 0, 1, 4, 5));
  vstore(dst + ld, VSHUF(t0, t2, 2, 3, 6, 7));
  vstore(dst + 2 * ld, VSHUF(t1, t3, 0, 1, 4, 5));
  vstore(dst + 3 * ld, VSHUF(t1, t3, 2, 3, 6, 7));
}

/* B's panel (kc, nc) into NR-wide strips, each (kc, NR) row-major. Whole strips and
 * slivers copy with constant trip counts (unrolled: no loop, so no runtime guard, per k). */
static void pack_b(int kc, int nc, const float *restrict b, int bks, int bns) {
  float *restrict out = packed_b;
  for (int j = 0; j < nc; j += NR) {
    const int w = nc - j < NR ? nc - j : NR;
    const float *col = b + j * bns;
    if (w == NR && bks == 1 && kc % 4 == 0) { /* B = a transpose: 4 x 4 blocks in vectors */
      for (int k = 0; k < kc; k += 4, out += 4 * NR)
        for (int h = 0; h < NR; h += 4) {
          const float *src = col + k + h * bns;
          transpose4(vload(src), vload(src + bns), vload(src + 2 * bns), vload(src + 3 * bns),
                     out + h, NR);
        }
      continue;
    }
    if (w == NR) {
      for (int k = 0; k < kc; ++k, out += NR)
        for (int q = 0; q < NR; ++q) out[q] = col[k * bks + q * bns];
      continue;
    }
    for (int k = 0; k < kc; ++k, out += NR) {
      int q = 0;
      for (; q < w; ++q) out[q] = col[k * bks + q * bns];
      for (; q < NR; ++q) out[q] = 0.0f;
    }
  }
}

/* A's sliver (mr, kc) into (kc, MR) row-major: MR rows at one k side by side. */
static void pack_a(int mr, int kc, const float *restrict a, int ams, int aks) {
  float *restrict out = packed_a;
  if (mr == MR && aks == 1 && kc % 4 == 0) { /* rows contiguous in k: 4 x 4 transposes */
    for (int k = 0; k < kc; k += 4, out += 4 * MR)
      transpose4(vload(a + k), vload(a + ams + k), vload(a + 2 * ams + k),
                 vload(a + 3 * ams + k), out, MR);
    return;
  }
  if (mr == MR) {
    for (int k = 0; k < kc; ++k, out += MR)
      for (int r = 0; r < MR; ++r) out[r] = a[r * ams + k * aks];
    return;
  }
  for (int k = 0; k < kc; ++k, out += MR) {
    int r = 0;
    for (; r < mr; ++r) out[r] = a[r * ams + k * aks];
    for (; r < MR; ++r) out[r] = 0.0f;
  }
}

/* One k of a tile: A's MR rows at this k are one vector, each broadcast from its lane. */
#define MICRO_STEP()                                                                  \
  do {                                                                                \
    const vf av = vload(ap);                                                          \
    const vf b0 = vload(bp), b1 = vload(bp + VW);                                     \
    vf s = VLANE(av, 0);                                                              \
    acc[0][0] = vadd(acc[0][0], vmul(s, b0));                                         \
    acc[0][1] = vadd(acc[0][1], vmul(s, b1));                                         \
    s = VLANE(av, 1);                                                                 \
    acc[1][0] = vadd(acc[1][0], vmul(s, b0));                                         \
    acc[1][1] = vadd(acc[1][1], vmul(s, b1));                                         \
    s = VLANE(av, 2);                                                                 \
    acc[2][0] = vadd(acc[2][0], vmul(s, b0));                                         \
    acc[2][1] = vadd(acc[2][1], vmul(s, b1));                                         \
    s = VLANE(av, 3);                                                                 \
    acc[3][0] = vadd(acc[3][0], vmul(s, b0));                                         \
    acc[3][1] = vadd(acc[3][1], vmul(s, b1));                                         \
    ap += as;                                                                         \
    bp += bs;                                                                         \
  } while (0)

/* c (MR, NR) = [c +] A (MR rows a vector at ap, as floats apart per k) x B (NR columns at
 * bp, bs floats apart per k), k = 0..kc. Unrolled by two: Cranelift computes a loop
 * body's arithmetic after all its loads, so a longer body would keep every step's
 * operands live at once and spill past x86's 16 vector registers (8 accumulators + 6
 * operands fit); a runtime's guard at each loop header (wasmtime's epoch or fuel check,
 * whose slow path is a call) is paid once per two steps. */
#ifndef UNROLL
#define UNROLL 3
#endif
static __attribute__((noinline)) void micro(int kc, const float *restrict ap, int as, const float *restrict bp, int bs,
                  float *restrict c, int ldc, int load) {
  vf acc[MR][2];
  for (int r = 0; r < MR; ++r) {
    acc[r][0] = load ? vload(c + r * ldc) : vsplat(0.0f);
    acc[r][1] = load ? vload(c + r * ldc + VW) : vsplat(0.0f);
  }
  int k = 0;
#ifdef __clang__
#pragma clang loop unroll(disable)
#endif
  for (; k + UNROLL <= kc; k += UNROLL) {
    MICRO_STEP();
    MICRO_STEP();
#if UNROLL > 2
    MICRO_STEP();
#endif
#if UNROLL > 3
    MICRO_STEP();
#endif
  }
#ifdef __clang__
#pragma clang loop unroll(disable)
#endif
  for (; k < kc; ++k) MICRO_STEP();
  for (int r = 0; r < MR; ++r) {
    vstore(c + r * ldc, acc[r][0]);
    vstore(c + r * ldc + VW, acc[r][1]);
  }
}

static void gemm(int M, int N, int K, const float *restrict a, int ams, int aks,
                 const float *restrict b, int bks, int bns, float *restrict c, int ldc,
                 int accumulate) {
  float edge[MR * NR] __attribute__((aligned(16)));
  /* B is read in place when its rows are contiguous and whole tiles cover them. */
  const int direct_b = bns == 1 && N % NR == 0;
  for (int k0 = 0; k0 < K; k0 += KC) {
    const int kc = K - k0 < KC ? K - k0 : KC;
    const int load = accumulate || k0 > 0;
    for (int j0 = 0; j0 < N; j0 += NC) {
      const int nc = N - j0 < NC ? N - j0 : NC;
      const float *panel = b + k0 * bks + j0 * bns;
      if (!direct_b) pack_b(kc, nc, panel, bks, bns);
      for (int i = 0; i < M; i += MR) {
        const int mr = M - i < MR ? M - i : MR;
        const float *ai = a + i * ams + k0 * aks;
        /* A is read in place when its MR rows at one k are contiguous (A = a transpose). */
        const int direct_a = ams == 1 && mr == MR;
        if (!direct_a) pack_a(mr, kc, ai, ams, aks);
        const float *ap = direct_a ? ai : packed_a;
        const int as = direct_a ? aks : MR;
        float *ci = c + i * ldc + j0;
        for (int j = 0; j < nc; j += NR) {
          const float *bp = direct_b ? panel + j : packed_b + j * kc;
          const int bs = direct_b ? bks : NR;
          const int nr = nc - j < NR ? nc - j : NR;
          if (mr == MR && nr == NR) {
            micro(kc, ap, as, bp, bs, ci + j, ldc, load);
            continue;
          }
          for (int r = 0; r < mr; ++r)
            for (int q = 0; q < nr; ++q) edge[r * NR + q] = load ? ci[r * ldc + j + q] : 0.0f;
          micro(kc, ap, as, bp, bs, edge, NR, 1);
          for (int r = 0; r < mr; ++r)
            for (int q = 0; q < nr; ++q) ci[r * ldc + j + q] = edge[r * NR + q];
        }
      }
    }
  }
}

/* ---- kernels --------------------------------------------------------------------------- */

/* y (n, out) = x (n, in) @ w.T + b, with w (out, in), read transposed as it is packed. */
EXPORT("dense_forward")
void dense_forward(const float *restrict x, const float *restrict w, const float *restrict b,
                   float *restrict y, int n, int in, int out) {
  for (int i = 0; i < n; ++i)
    for (int o = 0; o < out; ++o) y[i * out + o] = b[o];
  gemm(n, out, in, x, in, 1, w, 1, in, y, out, 1);
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
  gemm(out, in, n, dy, 1, out, x, in, 1, gw, in, 0); /* A = dy.T, read in place */
  if (dx) gemm(n, in, out, dy, out, 1, w, in, 1, dx, in, 0);
}

/* Vectorised by hand (clang compiles the scalar select to a branch per element), four
 * vectors a turn so that a runtime's per-iteration guard is paid once per 16 floats. */
EXPORT("relu_forward") void relu_forward(float *restrict y, int count) {
  int j = 0;
  for (; j + 4 * VW <= count; j += 4 * VW)
    for (int u = 0; u < 4 * VW; u += VW) {
      const vf v = vload(y + j + u);
      vstore(y + j + u, vwhere_pos(v, v));
    }
  for (; j < count; ++j) y[j] = y[j] > 0.0f ? y[j] : 0.0f;
}

/* dy *= (y > 0), y being ReLU's output (y > 0 exactly where its input was). */
EXPORT("relu_backward")
void relu_backward(const float *restrict y, float *restrict dy, int count) {
  int j = 0;
  for (; j + 4 * VW <= count; j += 4 * VW)
    for (int u = 0; u < 4 * VW; u += VW)
      vstore(dy + j + u, vwhere_pos(vload(y + j + u), vload(dy + j + u)));
  for (; j < count; ++j) dy[j] = y[j] > 0.0f ? dy[j] : 0.0f;
}

/* Mean cross-entropy of logits z (n, c) against labels; dz = (softmax(z) - onehot) / n.
 * Stable: each row is shifted by its max. Writes the number of rows whose argmax (first
 * maximum, as torch) equals the label to *correct. Returns the mean loss. */
EXPORT("softmax_xent")
double softmax_xent(const float *restrict z, const int32_t *restrict labels, float *restrict dz,
                    int n, int c, int32_t *restrict correct) {
  enum { KEEP = 1024 }; /* up to this many classes, each exp is computed once */
  static double e[KEEP];
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
    for (int j = 0; j < c; ++j) {
      const double ej = fm_exp((double)zi[j] - m);
      if (j < KEEP) e[j] = ej;
      sum += ej;
    }
    const int y = labels[i];
    total += m + fm_log(sum) - (double)zi[y];
    hits += arg == y;
    const double inv = 1.0 / sum;
    for (int j = 0; j < c; ++j) {
      const double p = (j < KEEP ? e[j] : fm_exp((double)zi[j] - m)) * inv;
      dzi[j] = (float)((p - (j == y ? 1.0 : 0.0)) / n);
    }
  }
  *correct = hits;
  return total / n;
}

/* One vector of the update; the flags are constants where it is inlined. */
INLINE void sgd_vec(const int has_anchor, const int has_decay, const int has_momentum,
                    float *restrict p, const float *restrict g, float *restrict v,
                    const float *restrict anchor, vf lr, vf momentum, vf decay, vf mu) {
  const vf pj = vload(p);
  vf gj = vload(g);
  if (has_anchor) gj = vadd(gj, vmul(mu, vsub(pj, vload(anchor))));
  if (has_decay) gj = vadd(gj, vmul(decay, pj));
  const vf vj = has_momentum ? vadd(vmul(momentum, vload(v)), gj) : gj;
  vstore(v, vj);
  vstore(p, vsub(pj, vmul(lr, vj)));
}

/* The vector part of the update, specialised per flag combination: a test inside the loop
 * would be one more branch per vector, and keeps the broadcast constants off registers. */
INLINE int sgd_body(const int has_anchor, const int has_decay, const int has_momentum,
                    float *restrict p, const float *restrict g, float *restrict v,
                    const float *restrict anchor, int count, float lr, float momentum,
                    float weight_decay, float proximal_mu) {
  const vf lr_v = vsplat(lr), mom_v = vsplat(momentum), wd_v = vsplat(weight_decay),
           mu_v = vsplat(proximal_mu);
  int j = 0;
  for (; j + 2 * VW <= count; j += 2 * VW) {
    sgd_vec(has_anchor, has_decay, has_momentum, p + j, g + j, v + j, anchor + j, lr_v, mom_v,
            wd_v, mu_v);
    sgd_vec(has_anchor, has_decay, has_momentum, p + j + VW, g + j + VW, v + j + VW,
            anchor + j + VW, lr_v, mom_v, wd_v, mu_v);
  }
  return j;
}

/* torch.optim.SGD's update, with the FedProx term when anchor is given. */
EXPORT("sgd_momentum")
void sgd_momentum(float *restrict p, const float *restrict g, float *restrict v,
                  const float *restrict anchor, int count, float lr, float momentum,
                  float weight_decay, float proximal_mu) {
  const int a = anchor != 0, d = weight_decay != 0.0f, m = momentum != 0.0f;
  const float *an = a ? anchor : g; /* never read without an anchor */
#define SGD_CASE(A, D, M) \
  sgd_body(A, D, M, p, g, v, an, count, lr, momentum, weight_decay, proximal_mu)
  int j;
  if (a)
    j = d ? (m ? SGD_CASE(1, 1, 1) : SGD_CASE(1, 1, 0)) : (m ? SGD_CASE(1, 0, 1) : SGD_CASE(1, 0, 0));
  else
    j = d ? (m ? SGD_CASE(0, 1, 1) : SGD_CASE(0, 1, 0)) : (m ? SGD_CASE(0, 0, 1) : SGD_CASE(0, 0, 0));
#undef SGD_CASE
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
  float *delta_a, *delta_b;
} mlp_t;

static uintptr_t falloc(uint32_t floats) { return fm_alloc(floats * 4u); }

/* A model of `layers` Linear layers with widths[0..layers]; 0 when out of memory. */
EXPORT("mlp_create") uintptr_t mlp_create(int layers, const int32_t *widths, int max_batch) {
  if (layers < 1 || layers > MAX_LAYERS || max_batch < 1) return 0;
  mlp_t *m = (mlp_t *)fm_alloc(sizeof(mlp_t));
  if (!m) return 0;
  m->layers = layers;
  m->max_batch = max_batch;
  int32_t params = 0, widest = 0;
  for (int l = 0; l <= layers; ++l) {
    if (widths[l] < 1) return 0;
    m->widths[l] = widths[l];
    if (widths[l] > widest) widest = widths[l];
  }
  for (int l = 0; l < layers; ++l) params += widths[l + 1] * widths[l] + widths[l + 1];
  m->num_params = params;
  m->max_width = widest;
  if (!(m->params = (float *)falloc(params)) || !(m->grads = (float *)falloc(params)) ||
      !(m->velocity = (float *)falloc(params)) || !(m->anchor = (float *)falloc(params)) ||
      !(m->x = (float *)falloc(max_batch * widths[0])) ||
      !(m->labels = (int32_t *)falloc(max_batch)) ||
      !(m->delta_a = (float *)falloc(max_batch * widest)) ||
      !(m->delta_b = (float *)falloc(max_batch * widest)))
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
    dense_forward(in, p, p + w[l + 1] * w[l], m->acts[l], n, w[l], w[l + 1]);
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
