# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True, initializedcheck=False
# distutils: language = c++
"""CPU fused pass of the CRD head (twin of csrc/cuda/crd_head.cu).

The projections Z_l = P'_l F_l are done beforehand by torch's BLAS, one per layer at that layer's own
resolution (docs/DESIGN.md "Linearity"). This pass then does, in one sweep over the output grid and without
materialising any (B, d, H, W) tensor:

    score[b, y, x] = || sum_l  (A_l^y (x) A_l^x) Z_l[b]  (y, x)  -  q ||_2

where A_l are the separable "3x3 average pool, then bilinear resize to the first grid" band matrices
of crd_fast/ops/plan.py (``plan`` / ``weights`` tables, shared with the CUDA kernels).

Layout: Z_l is (B, H_l, W_l, r) contiguous (channels last, so every tap is one contiguous r-vector).
One output row (b, y) per work item: a vertical pass builds T_l[j] = sum_i wy_i Z_l[sy+i, j] for every
source column j, then a horizontal pass adds sum_i wx_i T_l[sx+i] into the row accumulator, which
starts at -q. Each thread owns two small scratch buffers; everything runs without the GIL.

The residual pass (``fused_residual_pass``, for the local head of docs/DESIGN.md "Position-aware CRD") runs
the same sweep with one offset q_(y, x) per grid position and writes the accumulator, the residual vectors
sum - q_(y, x), into a (B, H0, W0, r) output instead of their norms.
"""

from cython.parallel cimport parallel, prange
from libc.math cimport sqrt
from libc.stdint cimport int32_t, uintptr_t
from libc.stdlib cimport free, malloc

ctypedef fused real:
    float
    double

# Must match crd_fast/ops/plan.py: ints per layer header, taps per band row.
cdef enum:
    HEADER = 4
    MAX_TAPS = 4


cdef void _accumulate_row(real** z, Py_ssize_t num_layers, const int32_t* plan, const real* weights,
                          const real* q, Py_ssize_t q_step, Py_ssize_t b, Py_ssize_t y, Py_ssize_t h0,
                          Py_ssize_t w0, Py_ssize_t r, real* acc, real* tmp) noexcept nogil:
    """acc[x] = sum_l pool/resize(Z_l)[b, y, x] - q_(y, x) for the w0 positions of output row (b, y).

    q_(y, x) starts at q + (y * w0 + x) * q_step: q_step = 0 is one shared q (the norm pass), q_step = r
    one offset per grid position (the residual pass of the local head, docs/DESIGN.md "Position-aware CRD").
    """
    cdef Py_ssize_t l, i, j, k, x, h, w, sy, ny, sx, nx
    cdef Py_ssize_t rows = h0 + w0
    cdef const int32_t* taps
    cdef const real* wl
    cdef const real* src
    cdef const real* qx
    cdef real* dst
    cdef real wi

    for x in range(w0):
        dst = acc + x * r
        qx = q + (y * w0 + x) * q_step
        for k in range(r):
            dst[k] = -qx[k]

    for l in range(num_layers):
        h = plan[l * HEADER + 1]
        w = plan[l * HEADER + 2]
        taps = plan + num_layers * HEADER + l * rows * 2
        wl = weights + l * rows * MAX_TAPS
        sy = taps[2 * y]
        ny = taps[2 * y + 1]
        # vertical: tmp[j] = sum_i wy_i * Z_l[b, sy + i, j]
        for j in range(w):
            dst = tmp + j * r
            src = z[l] + ((b * h + sy) * w + j) * r
            wi = wl[y * MAX_TAPS]
            for k in range(r):
                dst[k] = wi * src[k]
            for i in range(1, ny):
                src = z[l] + ((b * h + sy + i) * w + j) * r
                wi = wl[y * MAX_TAPS + i]
                for k in range(r):
                    dst[k] = dst[k] + wi * src[k]
        # horizontal: acc[x] += sum_i wx_i * tmp[sx + i]
        for x in range(w0):
            sx = taps[2 * (h0 + x)]
            nx = taps[2 * (h0 + x) + 1]
            dst = acc + x * r
            for i in range(nx):
                src = tmp + (sx + i) * r
                wi = wl[(h0 + x) * MAX_TAPS + i]
                for k in range(r):
                    dst[k] = dst[k] + wi * src[k]


cdef void _fuse_row(real** z, Py_ssize_t num_layers, const int32_t* plan, const real* weights,
                    const real* q, real* out, Py_ssize_t b, Py_ssize_t y, Py_ssize_t h0, Py_ssize_t w0,
                    Py_ssize_t r, real* acc, real* tmp) noexcept nogil:
    cdef Py_ssize_t k, x
    cdef const real* src
    cdef double s0, s1, s2, s3, v0, v1, v2, v3

    _accumulate_row(z, num_layers, plan, weights, q, 0, b, y, h0, w0, r, acc, tmp)
    for x in range(w0):
        src = acc + x * r
        # four independent double accumulators: no reassociation flags needed for speed, and a d=1536
        # sum of squares keeps full float32 precision.
        s0 = 0.0
        s1 = 0.0
        s2 = 0.0
        s3 = 0.0
        k = 0
        while k + 4 <= r:
            v0 = src[k]
            v1 = src[k + 1]
            v2 = src[k + 2]
            v3 = src[k + 3]
            s0 += v0 * v0
            s1 += v1 * v1
            s2 += v2 * v2
            s3 += v3 * v3
            k += 4
        while k < r:
            v0 = src[k]
            s0 += v0 * v0
            k += 1
        out[(b * h0 + y) * w0 + x] = <real>sqrt((s0 + s1) + (s2 + s3))


cdef int _fused_pass(real** z, Py_ssize_t num_layers, const int32_t* plan, const real* weights, const real* q,
                     real* out, Py_ssize_t batch, Py_ssize_t h0, Py_ssize_t w0, Py_ssize_t r,
                     Py_ssize_t max_w, int num_threads) noexcept nogil:
    """Runs every output row; returns the number of rows whose scratch allocation failed (0 = success)."""
    cdef Py_ssize_t row
    cdef int failed = 0
    cdef real* acc
    cdef real* tmp
    with parallel(num_threads=num_threads):
        acc = <real*>malloc(w0 * r * sizeof(real))
        tmp = <real*>malloc(max_w * r * sizeof(real))
        for row in prange(batch * h0, schedule="static"):
            if acc == NULL or tmp == NULL:
                failed += 1
            else:
                _fuse_row(z, num_layers, plan, weights, q, out, row // h0, row % h0, h0, w0, r, acc, tmp)
        free(acc)
        free(tmp)
    return failed


cdef int _residual_pass(real** z, Py_ssize_t num_layers, const int32_t* plan, const real* weights,
                        const real* q, real* out, Py_ssize_t batch, Py_ssize_t h0, Py_ssize_t w0, Py_ssize_t r,
                        Py_ssize_t max_w, int num_threads) noexcept nogil:
    """out[b, y, x, :] = sum - q_(y, x) for every row, written in place (out is the accumulator); returns the
    number of rows whose scratch allocation failed (0 = success)."""
    cdef Py_ssize_t row
    cdef int failed = 0
    cdef real* tmp
    with parallel(num_threads=num_threads):
        tmp = <real*>malloc(max_w * r * sizeof(real))
        for row in prange(batch * h0, schedule="static"):
            if tmp == NULL:
                failed += 1
            else:
                _accumulate_row(z, num_layers, plan, weights, q, r, row // h0, row % h0, h0, w0, r,
                                out + row * w0 * r, tmp)
        free(tmp)
    return failed


cdef int _run(real* tag, list z_ptrs, uintptr_t plan, uintptr_t weights, uintptr_t q, uintptr_t out,
              Py_ssize_t batch, Py_ssize_t h0, Py_ssize_t w0, Py_ssize_t r, Py_ssize_t max_w,
              int num_threads, bint residual) except -1:
    cdef Py_ssize_t num_layers = len(z_ptrs)
    cdef Py_ssize_t l
    cdef int failed
    cdef real** z = <real**>malloc(num_layers * sizeof(real*))
    if z == NULL:
        raise MemoryError("crd_head_cpu: cannot allocate the layer pointer table")
    try:
        for l in range(num_layers):
            z[l] = <real*><uintptr_t>z_ptrs[l]
        with nogil:
            if residual:
                failed = _residual_pass(z, num_layers, <const int32_t*>plan, <const real*>weights,
                                        <const real*>q, <real*>out, batch, h0, w0, r, max_w, num_threads)
            else:
                failed = _fused_pass(z, num_layers, <const int32_t*>plan, <const real*>weights, <const real*>q,
                                     <real*>out, batch, h0, w0, r, max_w, num_threads)
    finally:
        free(z)
    if failed:
        raise MemoryError(f"crd_head_cpu: scratch allocation failed in {failed} rows (r={r}, width={max_w})")
    return 0


def fused_pass(str dtype, list z_ptrs, uintptr_t plan, uintptr_t weights, uintptr_t q, uintptr_t out,
               Py_ssize_t batch, Py_ssize_t h0, Py_ssize_t w0, Py_ssize_t r, Py_ssize_t max_w,
               int num_threads):
    """out[b, y, x] = ||sum_l pool/resize(Z_l)[b, y, x] - q||, pointers as integers (see module docstring).

    Callers (crd_fast/ops/cpu.py only) have checked every shape, dtype and contiguity: this takes
    the ``plan``/``weights`` tables of crd_fast/ops/plan.py, Z_l (B, H_l, W_l, r), q (r,), out (B, H0, W0).
    """
    if num_threads < 1:
        raise ValueError(f"num_threads must be >= 1, got {num_threads}")
    if batch == 0 or h0 == 0 or w0 == 0:
        return
    _dispatch(dtype, z_ptrs, plan, weights, q, out, batch, h0, w0, r, max_w, num_threads, False)


def fused_residual_pass(str dtype, list z_ptrs, uintptr_t plan, uintptr_t weights, uintptr_t q, uintptr_t out,
                        Py_ssize_t batch, Py_ssize_t h0, Py_ssize_t w0, Py_ssize_t r, Py_ssize_t max_w,
                        int num_threads):
    """out[b, y, x, :] = sum_l pool/resize(Z_l)[b, y, x] - q[y, x, :]: the residual vectors, no norm.

    As :func:`fused_pass`, but q is (H0, W0, r), one offset per grid position, and out is (B, H0, W0, r).
    """
    if num_threads < 1:
        raise ValueError(f"num_threads must be >= 1, got {num_threads}")
    if batch == 0 or h0 == 0 or w0 == 0 or r == 0:
        return
    _dispatch(dtype, z_ptrs, plan, weights, q, out, batch, h0, w0, r, max_w, num_threads, True)


cdef _dispatch(str dtype, list z_ptrs, uintptr_t plan, uintptr_t weights, uintptr_t q, uintptr_t out,
               Py_ssize_t batch, Py_ssize_t h0, Py_ssize_t w0, Py_ssize_t r, Py_ssize_t max_w, int num_threads,
               bint residual):
    if dtype == "float32":
        _run(<float*>NULL, z_ptrs, plan, weights, q, out, batch, h0, w0, r, max_w, num_threads, residual)
    elif dtype == "float64":
        _run(<double*>NULL, z_ptrs, plan, weights, q, out, batch, h0, w0, r, max_w, num_threads, residual)
    else:
        raise TypeError(f"crd_head_cpu: dtype must be 'float32' or 'float64', got {dtype!r}")


# ---- bfloat16 projections (csrc/cpu/crd_head_bf16.h): the bf16 head's pass, float32 arithmetic -----------------

cdef extern from "crd_head_bf16.h" namespace "crd_bf16" nogil:
    cdef struct Pass:
        const unsigned short* const* z
        Py_ssize_t num_layers
        const int32_t* plan
        const float* weights
        const float* q
        Py_ssize_t q_step
        float* out
        Py_ssize_t h0
        Py_ssize_t w0
        Py_ssize_t r
        bint residual
    ctypedef void (*RowFn)(const Pass*, Py_ssize_t, float*) noexcept nogil
    RowFn select_row(int isa)
    Py_ssize_t scratch_floats(Py_ssize_t w0, Py_ssize_t max_w)
    int best_isa()

#: Instruction sets of the bf16 pass's row functions, by the index ``select_row`` takes.
BF16_ISAS = ("baseline", "avx2", "avx512")


cdef int _bf16_rows(const Pass* p, RowFn fn, Py_ssize_t rows, Py_ssize_t max_w, int num_threads) noexcept nogil:
    """Runs every output row; returns the number of rows whose scratch allocation failed (0 = success)."""
    cdef Py_ssize_t row
    cdef int failed = 0
    cdef float* scratch
    with parallel(num_threads=num_threads):
        scratch = <float*>malloc(scratch_floats(p.w0, max_w) * sizeof(float))
        for row in prange(rows, schedule="static"):
            if scratch == NULL:
                failed += 1
            else:
                fn(p, row, scratch)
        free(scratch)
    return failed


def bf16_isa():
    """Name of the instruction set the bf16 pass runs on this processor ("avx512", "avx2" or "baseline")."""
    return BF16_ISAS[best_isa()]


def fused_pass_bf16(list z_ptrs, uintptr_t plan, uintptr_t weights, uintptr_t q, uintptr_t out,
                    Py_ssize_t batch, Py_ssize_t h0, Py_ssize_t w0, Py_ssize_t r, Py_ssize_t max_w,
                    int num_threads, bint residual=False, str isa="auto"):
    """The fused pass (norms) or, with ``residual``, the residual pass over bfloat16 projections Z_l.

    As :func:`fused_pass` / :func:`fused_residual_pass` with dtype "float32", except that the Z_l are
    (B, H_l, W_l, r) bfloat16 (widened to float32 on load); plan/weights/q/out are float32 as there.
    ``isa`` ("auto" = the best this processor runs, or one of ``BF16_ISAS``) picks the compiled variant.
    """
    cdef Pass p
    cdef RowFn fn
    cdef Py_ssize_t num_layers = len(z_ptrs)
    cdef Py_ssize_t l
    cdef int failed
    cdef const unsigned short** z
    if num_threads < 1:
        raise ValueError(f"num_threads must be >= 1, got {num_threads}")
    if isa != "auto" and isa not in BF16_ISAS:
        raise ValueError(f"isa must be 'auto' or one of {BF16_ISAS}, got {isa!r}")
    fn = select_row(-1 if isa == "auto" else BF16_ISAS.index(isa))
    if fn == NULL:
        raise RuntimeError(f"this processor cannot run the {isa} variant (best: {bf16_isa()})")
    if batch == 0 or h0 == 0 or w0 == 0 or r == 0:
        return
    z = <const unsigned short**>malloc(num_layers * sizeof(unsigned short*))
    if z == NULL:
        raise MemoryError("crd_head_cpu: cannot allocate the layer pointer table")
    try:
        for l in range(num_layers):
            z[l] = <const unsigned short*><uintptr_t>z_ptrs[l]
        p.z = z
        p.num_layers = num_layers
        p.plan = <const int32_t*>plan
        p.weights = <const float*>weights
        p.q = <const float*>q
        p.q_step = r if residual else 0
        p.out = <float*>out
        p.h0 = h0
        p.w0 = w0
        p.r = r
        p.residual = residual
        with nogil:
            failed = _bf16_rows(&p, fn, batch * h0, max_w, num_threads)
    finally:
        free(z)
    if failed:
        raise MemoryError(f"crd_head_cpu: scratch allocation failed in {failed} rows (r={r}, width={max_w})")


cdef extern from *:
    """
    #ifdef _OPENMP
    static int crd_openmp_compiled(void) { return 1; }
    #else
    static int crd_openmp_compiled(void) { return 0; }
    #endif
    """
    int crd_openmp_compiled()


def openmp_compiled():
    """True when this module was compiled with OpenMP (prange runs in parallel)."""
    return bool(crd_openmp_compiled())
