/* sub8.quant._kernels: the MRACos regularizer's fused CPU kernel (sub8.quant.mracos).
 *
 * One pass over the weights gives, per weight, R(w) and dR/dw (mracos.py's module docstring defines R); the
 * PyTorch version of the same formula runs ~25 elementwise passes. No PyTorch headers: the caller passes the
 * tensors' data pointers as integers (contiguous float32), so this builds in a second with the C compiler alone.
 *
 * In grid units y = w / scale every level is an integer; a weight's cell is looked up from floor(y) in two
 * 256-entry tables (the cell's low level and 1 / width, in grid units). With u = (y − low) · inv_width and
 * v = clamp(u, 0, 1), let d = min(v, 1 − v), the distance to the nearer level in cell widths, and h = π d / 2.
 * Then 1 − |cos πv| = 1 − cos πd = 2 sin² h and |d/du (1 − |cos πv|)| = π sin πd = 2π sin h cos h, so R and its
 * gradient need sin and cos on [0, π/4] only, where short Taylor polynomials are exact to float precision
 * (remainder < 2e-9) and, unlike 1 − cos(πd) in float, keep R's relative precision near a level.
 *
 * R is summed per block of `block` weights into a double, one per block, so the total does not depend on how the
 * blocks are spread over threads.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <math.h>
#include <stdint.h>

#define TILE 1024 /* weights whose R is summed from a stack buffer: the loop computing R alone vectorizes */
#define LANES 16  /* independent float accumulators: a vectorized sum of R without reassociating */

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
/* One build runs the widest vector unit of the machine it runs on: the loader picks the clone. */
#define VECTOR_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define VECTOR_CLONES
#endif

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

VECTOR_CLONES
static void mracos_blocks(const float *restrict w, float *restrict grad, int64_t n, const float *restrict low,
                          const float *restrict inv_width,
                          float inv_scale, double *restrict block_sums, int64_t block) {
    float r[TILE];
    for (int64_t a = 0; a < n; a += block) {
        int64_t end = a + block < n ? a + block : n;
        double sum = 0.0;
        for (int64_t t = a; t < end; t += TILE) {
            int64_t m = end - t < TILE ? end - t : TILE;
            for (int64_t i = 0; i < m; i++) r[i] = mracos_one(w[t + i], inv_scale, low, inv_width, &grad[t + i]);
            float lanes[LANES] = {0};
            int64_t i = 0;
            for (; i + LANES <= m; i += LANES)
                for (int j = 0; j < LANES; j++) lanes[j] += r[i + j];
            for (; i < m; i++) sum += r[i];
            for (int j = 0; j < LANES; j++) sum += lanes[j];
        }
        block_sums[a / block] = sum;
    }
}

/* mracos(w, grad, n, low, inv_width, inv_scale, block_sums, block): addresses as ints; releases the GIL. */
static PyObject *mracos(PyObject *self, PyObject *args) {
    unsigned long long w, grad, low, inv_width, block_sums;
    long long n, block;
    float inv_scale;
    if (!PyArg_ParseTuple(args, "KKLKKfKL", &w, &grad, &n, &low, &inv_width, &inv_scale, &block_sums, &block))
        return NULL;
    if (n < 0 || block < 1) {
        PyErr_Format(PyExc_ValueError, "mracos: need n >= 0 and block >= 1, got n=%lld, block=%lld", n, block);
        return NULL;
    }
    Py_BEGIN_ALLOW_THREADS
    mracos_blocks((const float *)(uintptr_t)w, (float *)(uintptr_t)grad, n, (const float *)(uintptr_t)low,
                  (const float *)(uintptr_t)inv_width, inv_scale, (double *)(uintptr_t)block_sums, block);
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"mracos", mracos, METH_VARARGS, "R(w) per block sum and dR/dw of contiguous float32 weights (see the source)."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_kernels", "sub8's fused CPU kernels.", -1, methods};

PyMODINIT_FUNC PyInit__kernels(void) { return PyModule_Create(&module); }
