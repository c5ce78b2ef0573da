/* sub8.quant._kernels: fused CPU kernels of the MRACos regularizer (sub8.quant.mracos) and of GQ's soft-to-hard
 * assignment (sub8.quant.gq), called through sub8.quant.kernels. Each is one pass over the weights where the PyTorch
 * version of the same formulas runs tens of elementwise passes. No PyTorch headers: the caller passes the tensors'
 * data pointers as integers (contiguous float32), so this builds in a second or two with the C compiler alone.
 *
 * setup.py compiles with "no NaN, no signed zeros" so that GCC vectorizes the clamps and selects. So nothing here
 * relies on a NaN propagating: a table index is clamped in integers (in bounds for any input), and non-finite
 * weights are found by a bit test, which those flags cannot fold away: MRACos counts them (the caller then makes
 * the sum NaN), GQ's forward passes them through to its output and its backward leaves them out.
 *
 * ---- MRACos ----
 * One pass gives, per weight, R(w) and dR/dw (mracos.py's module docstring defines R). In grid units y = w / scale
 * every level is an integer; a weight's cell is looked up from floor(y) in two 256-entry tables (the cell's low level
 * and 1 / width, in grid units). With u = (y − low) · inv_width and v = clamp(u, 0, 1), let d = min(v, 1 − v), the
 * distance to the nearer level in cell widths, and h = π d / 2. Then 1 − |cos πv| = 1 − cos πd = 2 sin² h and
 * |d/du (1 − |cos πv|)| = π sin πd = 2π sin h cos h, so R and its gradient need sin and cos on [0, π/4] only, where
 * short Taylor polynomials are exact to float precision (remainder < 2e-9) and, unlike 1 − cos(πd) in float, keep
 * R's relative precision near a level.
 *
 * R is summed per block of `block` weights into a double, one per block, then over the blocks in order.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <float.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define TILE 1024 /* weights whose R is summed from a stack buffer: the loop computing R alone vectorizes */
#define LANES 16  /* independent float accumulators: a vectorized sum of R without reassociating */

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
/* One build runs the widest vector unit of the machine it runs on: the loader picks the clone. */
#define VECTOR_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define VECTOR_CLONES
#endif

static inline int is_finite(float x) {
    uint32_t bits;
    memcpy(&bits, &x, sizeof bits);
    return (bits & 0x7f800000u) != 0x7f800000u;
}

static inline float mracos_one(float w, float inv_scale, const float *low, const float *inv_width, float *grad) {
    const float pi = 3.14159265358979f;
    float y = w * inv_scale;
    /* floor(y) clamped to [-128, 127], by truncation: floorf keeps GCC from vectorizing the loop, as do nested
       conditionals (hence one per line, and comparisons as 0/1 below). */
    float c = y < -128.0f ? -128.0f : y;
    c = c > 127.0f ? 127.0f : c;
    int k = (int)c;
    k = k < -128 ? -128 : k; /* in bounds whatever c is: a NaN weight must not index outside the tables */
    k = k > 127 ? 127 : k;
    int cell = k - ((float)k > c) + 128;
    float iw = inv_width[cell];
    float u = (y - low[cell]) * iw;
    float v = u < 0.0f ? 0.0f : u;
    v = v > 1.0f ? 1.0f : v;
    float outside = u - v;
    float d = v < 0.5f ? v : 1.0f - v;
    float h = (0.5f * pi) * d;
    float h2 = h * h;
    float sin_h = h * (1.0f + h2 * (-1.0f / 6 + h2 * (1.0f / 120 + h2 * (-1.0f / 5040 + h2 * (1.0f / 362880)))));
    float cos_h = 1.0f + h2 * (-0.5f + h2 * (1.0f / 24 + h2 * (-1.0f / 720 + h2 * (1.0f / 40320 + h2 * (-1.0f / 3628800)))));
    /* dR/du: towards the upper level below the midpoint, the lower one above it, 0 on the midpoint itself. */
    float side = (float)(v < 0.5f) - (float)(v > 0.5f);
    float out_sign = (float)(outside > 0.0f) - (float)(outside < 0.0f);
    *grad = (side * (2.0f * pi) * sin_h * cos_h + 2.0f * out_sign) * (iw * inv_scale);
    return 2.0f * sin_h * sin_h + 2.0f * fabsf(outside);
}

/* One block: R summed into a double, dR/dw into grad; returns the non-finite weights it met. */
VECTOR_CLONES
static int64_t mracos_block(const float *restrict w, float *restrict grad, int64_t n, const float *restrict low,
                            const float *restrict inv_width, float inv_scale, double *restrict sum_out) {
    float r[TILE];
    int64_t non_finite = 0;
    double sum = 0.0;
    for (int64_t t = 0; t < n; t += TILE) {
        int64_t m = n - t < TILE ? n - t : TILE;
        for (int64_t i = 0; i < m; i++) r[i] = mracos_one(w[t + i], inv_scale, low, inv_width, &grad[t + i]);
        for (int64_t i = 0; i < m; i++) non_finite += !is_finite(w[t + i]);
        float lanes[LANES] = {0};
        int64_t i = 0;
        for (; i + LANES <= m; i += LANES)
            for (int j = 0; j < LANES; j++) lanes[j] += r[i + j];
        for (; i < m; i++) sum += r[i];
        for (int j = 0; j < LANES; j++) sum += lanes[j];
    }
    *sum_out = sum;
    return non_finite;
}

/* mracos(w, grad, n, low, inv_width, inv_scale, block) -> (Σ R, non-finite weights): dR/dw into grad; R summed per
 * block of `block` weights on OpenMP's threads, then over the blocks in order (the same bits at any thread count);
 * addresses as ints. */
static PyObject *mracos(PyObject *self, PyObject *args) {
    unsigned long long w, grad, low, inv_width;
    long long n, block, non_finite = 0;
    float inv_scale;
    if (!PyArg_ParseTuple(args, "KKLKKfL", &w, &grad, &n, &low, &inv_width, &inv_scale, &block)) return NULL;
    if (n < 0 || block < 1) {
        PyErr_Format(PyExc_ValueError, "mracos: need n >= 0 and block >= 1, got n=%lld, block=%lld", n, block);
        return NULL;
    }
    const float *wp = (const float *)(uintptr_t)w, *lowp = (const float *)(uintptr_t)low;
    const float *inv_widthp = (const float *)(uintptr_t)inv_width;
    float *gradp = (float *)(uintptr_t)grad;
    const long long blocks = (n + block - 1) / block;
    double *sums = malloc((size_t)(blocks > 0 ? blocks : 1) * sizeof(double));
    if (!sums) return PyErr_NoMemory();
    double total = 0.0;
    Py_BEGIN_ALLOW_THREADS
#pragma omp parallel for schedule(static) reduction(+ : non_finite)
    for (long long b = 0; b < blocks; b++) {
        const long long start = b * block, count = n - start < block ? n - start : block;
        non_finite += mracos_block(wp + start, gradp + start, count, lowp, inv_widthp, inv_scale, &sums[b]);
    }
    for (long long b = 0; b < blocks; b++) total += sums[b];
    Py_END_ALLOW_THREADS
    free(sums);
    return Py_BuildValue("dL", total, non_finite);
}

/* ---- GQ ----
 * The formulas, names and tables of gq.py's _SoftQuantize, _CellIndex and _CellTables: find each weight's cell (the
 * bin table, then `passes` − 1 compare-and-step passes), then the hard level, the window of two in closed form, or
 * the softmax over a window of `width` levels; the backward recomputes the same terms from the saved cell. Weights
 * go GQ_TILE at a time through short loops that the compiler vectorizes (a loop per window position, gathers of
 * the levels, exp by a polynomial); the level gradients are then summed per (window position, cell) in doubles, in
 * four interleaved copies so that runs of one cell (a 1-bit tensor has one) do not wait on each other's adds. */

#define GQ_LOGIT_FLOOR (-64.0f) /* gq.LOGIT_FLOOR */
#define GQ_MAX_WIDTH 16         /* gq.KERNEL_MAX_WINDOW: wider windows run the PyTorch version */
#define GQ_TILE 256
#define GQ_COPIES 4

typedef struct {
    const float *levels; /* (K,) sorted */
    int num_levels, width;
    float beta;
    /* _CellIndex: bins over [low, low + bins / inv_width); per bin the first cell, a threshold and the cell past it;
       per cell the next threshold and the cell past it (the last threshold is +inf). */
    float low, inv_width;
    int bins, passes;
    const float *bin_cell, *bin_threshold, *bin_target, *thresholds, *targets;
} GQTables;

/* e^t for t in [−64, 64] (all that GQ takes exp of: clamped logits), to ~2 ulp: t = n ln2 + r, |r| <= ln2 / 2,
 * e^r by its Taylor polynomial of degree 6 (remainder < 1.3e-7), 2^n by the exponent bits. The rounding of
 * t / ln2 to n adds and subtracts 1.5 · 2^23, exact in float32 (nothing here is compiled with reassociation). */
static inline float gq_exp(float t) {
    const float shift = 12582912.0f;
    float z = t * 1.44269504f + shift;
    float n = z - shift;
    float r = t - n * 0.693359375f - n * -2.12194440e-4f;
    float p = 1.0f + r * (1.0f + r * (0.5f + r * (1.0f / 6 + r * (1.0f / 24 + r * (1.0f / 120 + r * (1.0f / 720))))));
    int32_t zi, pi;
    memcpy(&zi, &z, sizeof zi);
    memcpy(&pi, &p, sizeof pi);
    pi += (zi - 0x4B400000) * (1 << 23);
    memcpy(&p, &pi, sizeof p);
    return p;
}

/* _pair_probability: σ(β (hi − lo)(2x − lo − hi)), the logit clamped to ±64. */
static inline float gq_pair_probability(float x, float lo, float hi, float beta) {
    float logit = (x + x - lo - hi) * (hi - lo) * beta;
    logit = logit < GQ_LOGIT_FLOOR ? GQ_LOGIT_FLOOR : logit;
    logit = logit > -GQ_LOGIT_FLOOR ? -GQ_LOGIT_FLOOR : logit;
    return 1.0f / (1.0f + gq_exp(-logit));
}

/* The cell of x[0..m) and, in `finite`, 1 for a finite weight, 0 otherwise (a NaN still gets a cell in range). */
VECTOR_CLONES
static void gq_cells(const GQTables *t, const float *restrict x, int m, int32_t *restrict cell,
                     int32_t *restrict finite) {
    /* Locals, not t->…: a field read through t could alias the stores, which keeps the loops scalar. */
    const float low = t->low, inv_width = t->inv_width, top = (float)(t->bins - 1);
    const int last_bin = t->bins - 1, passes = t->passes;
    const float *restrict bin_cell = t->bin_cell, *restrict bin_threshold = t->bin_threshold;
    const float *restrict bin_target = t->bin_target, *restrict thresholds = t->thresholds;
    const float *restrict targets = t->targets;
    for (int i = 0; i < m; i++) {
        float y = (x[i] - low) * inv_width;
        y = y < 0.0f ? 0.0f : y;
        y = y > top ? top : y;
        int b = (int)y;
        b = b < 0 ? 0 : b; /* in bounds whatever x is */
        b = b > last_bin ? last_bin : b;
        float above = (float)(x[i] >= bin_threshold[b]);
        cell[i] = (int)(bin_cell[b] + above * (bin_target[b] - bin_cell[b]));
        finite[i] = is_finite(x[i]);
    }
    for (int pass = 1; pass < passes; pass++)
        for (int i = 0; i < m; i++) {
            float above = (float)(x[i] >= thresholds[cell[i]]);
            cell[i] = (int)((float)cell[i] + above * (targets[cell[i]] - (float)cell[i]));
        }
}

/* The window of each weight: c[k][i], d[k][i] = x − c and e[k][i] = exp(max(−β (d² − min d²), −64)), and Z. */
VECTOR_CLONES
static void gq_window(const GQTables *t, const float *restrict x, const int32_t *restrict cell, int m,
                      float (*restrict c)[GQ_TILE], float (*restrict d)[GQ_TILE], float (*restrict e)[GQ_TILE],
                      float *restrict total) {
    const int width = t->width, last_start = t->num_levels - t->width;
    const float *restrict levels = t->levels, minus_beta = -t->beta;
    float nearest[GQ_TILE];
    int32_t start[GQ_TILE];
    for (int i = 0; i < m; i++) {
        int s = cell[i] - width / 2 + 1;
        s = s < 0 ? 0 : s;
        start[i] = s > last_start ? last_start : s;
        nearest[i] = FLT_MAX;
        total[i] = 0.0f;
    }
    for (int k = 0; k < width; k++) {
        float *restrict ck = c[k], *restrict dk = d[k], *restrict ek = e[k];
        for (int i = 0; i < m; i++) {
            ck[i] = levels[start[i] + k];
            dk[i] = x[i] - ck[i];
            ek[i] = dk[i] * dk[i];
            nearest[i] = ek[i] < nearest[i] ? ek[i] : nearest[i];
        }
    }
    for (int k = 0; k < width; k++) {
        float *restrict ek = e[k];
        for (int i = 0; i < m; i++) {
            float logit = (ek[i] - nearest[i]) * minus_beta;
            ek[i] = gq_exp(logit < GQ_LOGIT_FLOOR ? GQ_LOGIT_FLOOR : logit);
            total[i] += ek[i];
        }
    }
}

VECTOR_CLONES
static void gq_forward_all(const GQTables *t, const float *restrict x, int64_t n, int hard, float *restrict out,
                           uint8_t *restrict cells) {
    float c[GQ_MAX_WIDTH][GQ_TILE], d[GQ_MAX_WIDTH][GQ_TILE], e[GQ_MAX_WIDTH][GQ_TILE], total[GQ_TILE];
    int32_t cell[GQ_TILE], finite[GQ_TILE];
    const float *levels = t->levels;
    for (int64_t a = 0; a < n; a += GQ_TILE) {
        const int m = n - a < GQ_TILE ? (int)(n - a) : GQ_TILE;
        const float *xt = x + a;
        float *ot = out + a;
        gq_cells(t, xt, m, cell, finite);
        if (hard) { /* the nearest level; a tie goes up, as in base.nearest_level */
            for (int i = 0; i < m; i++) {
                float lo = levels[cell[i]], hi = levels[cell[i] + 1];
                ot[i] = xt[i] >= (lo + hi) / 2 ? hi : lo;
            }
        } else if (t->width == 2) {
            for (int i = 0; i < m; i++) {
                float lo = levels[cell[i]], hi = levels[cell[i] + 1];
                ot[i] = lo + gq_pair_probability(xt[i], lo, hi, t->beta) * (hi - lo);
            }
        } else {
            gq_window(t, xt, cell, m, c, d, e, total);
            for (int i = 0; i < m; i++) ot[i] = 0.0f;
            for (int k = 0; k < t->width; k++)
                for (int i = 0; i < m; i++) ot[i] += e[k][i] * c[k][i];
            for (int i = 0; i < m; i++) ot[i] /= total[i];
        }
        for (int i = 0; i < m; i++) cells[a + i] = (uint8_t)cell[i];
        /* passed through: the loss becomes non-finite and training stops before the update */
        for (int i = 0; i < m; i++) ot[i] = finite[i] ? ot[i] : xt[i];
    }
}

/* Gradients (see _SoftQuantize): grad_w (skipped when NULL); per_cell[copy][k][cell] += ∂L/∂c of window position k;
 * returns ∂L/∂β. A non-finite weight contributes nothing (its forward already made the loss non-finite). */
VECTOR_CLONES
static double gq_backward_all(const GQTables *t, const float *restrict x, const float *restrict g,
                              const uint8_t *restrict cells, int64_t n, float *restrict grad_w,
                              double *restrict per_cell) {
    float c[GQ_MAX_WIDTH][GQ_TILE], d[GQ_MAX_WIDTH][GQ_TILE], e[GQ_MAX_WIDTH][GQ_TILE], total[GQ_TILE];
    float grad_x[GQ_TILE], soft[GQ_TILE], beta_terms[GQ_TILE];
    int32_t cell[GQ_TILE], finite[GQ_TILE];
    const float *levels = t->levels, beta = t->beta;
    const int64_t stride = t->num_levels - 1, copy_stride = t->width * stride;
    double beta_sum = 0.0;
    for (int64_t a = 0; a < n; a += GQ_TILE) {
        const int m = n - a < GQ_TILE ? (int)(n - a) : GQ_TILE;
        const float *xt = x + a, *gt = g + a;
        for (int i = 0; i < m; i++) {
            cell[i] = cells[a + i];
            finite[i] = is_finite(xt[i]);
        }
        for (int i = 0; i < m; i++) { /* a non-finite weight or upstream gradient gets g = 0 here */
            soft[i] = finite[i] ? gt[i] : 0.0f;
        }
        if (t->width == 2) { /* _pair_backward: e[0], e[1] hold the lo and hi level gradients */
            for (int i = 0; i < m; i++) {
                float xi = finite[i] ? xt[i] : 0.0f, gi = soft[i];
                float lo = levels[cell[i]], hi = levels[cell[i] + 1], width = hi - lo;
                float p = gq_pair_probability(xi, lo, hi, beta);
                float gp = gi * p;
                float r = (gi - gp) * p * width;
                float two_beta_r = r * (2 * beta);
                beta_terms[i] = r * ((xi + xi - lo - hi) * width);
                e[0][i] = (gi - gp) - two_beta_r * (xi - lo);
                e[1][i] = gp + two_beta_r * (xi - hi);
                grad_x[i] = two_beta_r * width;
            }
        } else {
            float safe_x[GQ_TILE];
            for (int i = 0; i < m; i++) safe_x[i] = finite[i] ? xt[i] : 0.0f;
            gq_window(t, safe_x, cell, m, c, d, e, total);
            float *gi = beta_terms; /* reused: g, then the ∂L/∂β terms */
            for (int i = 0; i < m; i++) {
                gi[i] = soft[i];
                soft[i] = 0.0f;
                grad_x[i] = 0.0f;
            }
            for (int k = 0; k < t->width; k++)
                for (int i = 0; i < m; i++) {
                    e[k][i] /= total[i]; /* p_k */
                    soft[i] += e[k][i] * c[k][i];
                }
            for (int k = 0; k < t->width; k++)
                for (int i = 0; i < m; i++) {
                    float gp = e[k][i] * gi[i];
                    float rd = (c[k][i] - soft[i]) * gp * d[k][i]; /* r_k d_k */
                    grad_x[i] += rd;
                    d[k][i] *= rd; /* r_k d_k², for ∂L/∂β */
                    e[k][i] = gp + 2 * beta * rd;
                }
            for (int i = 0; i < m; i++) {
                beta_terms[i] = 0.0f;
                grad_x[i] *= -2 * beta;
            }
            for (int k = 0; k < t->width; k++)
                for (int i = 0; i < m; i++) beta_terms[i] -= d[k][i];
        }
        for (int i = 0; i < m; i++) beta_sum += (double)beta_terms[i];
        if (grad_w)
            for (int i = 0; i < m; i++) grad_w[a + i] = finite[i] ? grad_x[i] : 0.0f;
        for (int k = 0; k < t->width; k++) {
            double *row = per_cell + k * stride;
            for (int i = 0; i < m; i++) row[(i % GQ_COPIES) * copy_stride + cell[i]] += (double)e[k][i];
        }
    }
    return beta_sum;
}

/* The tables' arguments, in GQTables's order: levels, K, width, beta, low, inv_width, bins, passes, bin_cell,
 * bin_threshold, bin_target, thresholds, targets (addresses as ints). */
#define GQ_TABLE_FORMAT "KiifffiiKKKKK"

static int gq_parse_tables(GQTables *t, unsigned long long *a) {
    if (t->num_levels < 2 || t->num_levels > 256 || t->width < 2 || t->width > t->num_levels ||
        t->width > GQ_MAX_WIDTH || t->bins < 1 || t->passes < 1) {
        PyErr_Format(PyExc_ValueError, "gq: bad tables (K=%d, width=%d, bins=%d, passes=%d)", t->num_levels,
                     t->width, t->bins, t->passes);
        return 0;
    }
    t->levels = (const float *)(uintptr_t)a[0];
    t->bin_cell = (const float *)(uintptr_t)a[1];
    t->bin_threshold = (const float *)(uintptr_t)a[2];
    t->bin_target = (const float *)(uintptr_t)a[3];
    t->thresholds = (const float *)(uintptr_t)a[4];
    t->targets = (const float *)(uintptr_t)a[5];
    return 1;
}

/* gq_forward(*tables, x, n, hard, out, cells, block): the soft or hard weights and each weight's cell, blocks of
 * `block` weights (a multiple of GQ_TILE) on OpenMP's threads. */
static PyObject *gq_forward(PyObject *self, PyObject *args) {
    GQTables t;
    unsigned long long a[6], x, out, cells;
    long long n, block;
    int hard;
    if (!PyArg_ParseTuple(args, GQ_TABLE_FORMAT "KLpKKL", &a[0], &t.num_levels, &t.width, &t.beta, &t.low,
                          &t.inv_width, &t.bins, &t.passes, &a[1], &a[2], &a[3], &a[4], &a[5], &x, &n, &hard, &out,
                          &cells, &block))
        return NULL;
    if (!gq_parse_tables(&t, a)) return NULL;
    if (n < 0 || block < 1 || block % GQ_TILE) {
        PyErr_Format(PyExc_ValueError, "gq_forward: need n >= 0 and block a multiple of %d, got n=%lld, block=%lld",
                     GQ_TILE, n, block);
        return NULL;
    }
    const float *xp = (const float *)(uintptr_t)x;
    float *outp = (float *)(uintptr_t)out;
    uint8_t *cellsp = (uint8_t *)(uintptr_t)cells;
    const long long blocks = (n + block - 1) / block;
    Py_BEGIN_ALLOW_THREADS
#pragma omp parallel for schedule(static)
    for (long long b = 0; b < blocks; b++) {
        const long long start = b * block, count = n - start < block ? n - start : block;
        gq_forward_all(&t, xp + start, count, hard, outp + start, cellsp + start);
    }
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

/* gq_backward(*tables, x, grad_out, cells, n, grad_w or 0, block, per_cell) -> ∂L/∂β: fills grad_w and adds the
 * level gradients to per_cell ((width, K − 1) float32). Per block of `block` weights on OpenMP's threads, its level
 * gradients and ∂L/∂β in doubles; then the blocks are added in order (the same bits at any thread count). */
static PyObject *gq_backward(PyObject *self, PyObject *args) {
    GQTables t;
    unsigned long long a[6], x, g, cells, grad_w, per_cell;
    long long n, block;
    if (!PyArg_ParseTuple(args, GQ_TABLE_FORMAT "KKKLKLK", &a[0], &t.num_levels, &t.width, &t.beta, &t.low,
                          &t.inv_width, &t.bins, &t.passes, &a[1], &a[2], &a[3], &a[4], &a[5], &x, &g, &cells, &n,
                          &grad_w, &block, &per_cell))
        return NULL;
    if (!gq_parse_tables(&t, a)) return NULL;
    if (n < 0 || block < 1) {
        PyErr_Format(PyExc_ValueError, "gq_backward: need n >= 0 and block >= 1, got n=%lld, block=%lld", n, block);
        return NULL;
    }
    const int64_t size = (int64_t)t.width * (t.num_levels - 1);
    const long long blocks = (n + block - 1) / block;
    double *partials = malloc((size_t)((blocks > 0 ? blocks : 1) * (size + 1)) * sizeof(double));
    if (!partials) return PyErr_NoMemory();
    double *beta_partials = partials + blocks * size;
    int out_of_memory = 0;
    double grad_beta = 0.0;
    Py_BEGIN_ALLOW_THREADS
#pragma omp parallel
    {
        double *copies = malloc((size_t)(GQ_COPIES * size) * sizeof(double)); /* this thread's scratch */
        if (!copies) {
#pragma omp atomic write
            out_of_memory = 1;
        }
#pragma omp for schedule(static)
        for (long long b = 0; b < blocks; b++) {
            if (!copies) continue;
            const long long start = b * block, count = n - start < block ? n - start : block;
            memset(copies, 0, (size_t)(GQ_COPIES * size) * sizeof(double));
            float *grad_w_block = grad_w ? (float *)(uintptr_t)grad_w + start : NULL;
            beta_partials[b] =
                gq_backward_all(&t, (const float *)(uintptr_t)x + start, (const float *)(uintptr_t)g + start,
                                (const uint8_t *)(uintptr_t)cells + start, count, grad_w_block, copies);
            double *partial = partials + b * size;
            for (int64_t k = 0; k < size; k++) {
                double sum = 0.0;
                for (int copy = 0; copy < GQ_COPIES; copy++) sum += copies[copy * size + k];
                partial[k] = sum;
            }
        }
        free(copies);
    }
    if (!out_of_memory) {
        float *table = (float *)(uintptr_t)per_cell;
        for (int64_t k = 0; k < size; k++) {
            double sum = 0.0;
            for (long long b = 0; b < blocks; b++) sum += partials[b * size + k];
            table[k] += (float)sum;
        }
        for (long long b = 0; b < blocks; b++) grad_beta += beta_partials[b];
    }
    Py_END_ALLOW_THREADS
    free(partials);
    if (out_of_memory) return PyErr_NoMemory();
    return PyFloat_FromDouble(grad_beta);
}

static PyMethodDef methods[] = {
    {"mracos", mracos, METH_VARARGS, "MRACos: R per block and dR/dw of contiguous float32 weights (see the source)."},
    {"gq_forward", gq_forward, METH_VARARGS, "GQ's soft or hard weights and each weight's cell (see the source)."},
    {"gq_backward", gq_backward, METH_VARARGS, "GQ's gradients to the weights, levels and sharpness (the source)."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_kernels", "sub8's fused CPU kernels.", -1, methods};

PyMODINIT_FUNC PyInit__kernels(void) { return PyModule_Create(&module); }
