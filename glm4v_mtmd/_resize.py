"""Pure-numpy, bit-exact re-implementation of torch's CPU uint8 bicubic antialiased resize.

This reproduces ``torchvision.transforms.v2.functional.resize(x, [out_h, out_w],
interpolation=BICUBIC, antialias=True)`` on a CPU uint8 tensor, which (torchvision
``resize_image``) calls ``torch.nn.functional.interpolate(x, size, mode="bicubic",
align_corners=False, antialias=True)`` directly on the uint8 tensor, i.e.
``torch._C._nn._upsample_bicubic2d_aa`` -> ``upsample_bicubic2d_aa_kernel_impl``
(aten/src/ATen/native/cpu/UpSampleKernel.cpp), which runs either
``upsample_avx_bilinear_bicubic_uint8<HelperInterpCubic>`` (AVX2 build,
UpSampleKernelAVXAntialias.h) or ``upsample_separable_Nd_kernel_impl<2, HelperInterpCubic>``
(DEFAULT / AVX512 builds).  Both do the same integer arithmetic:

* per axis, weights in float64 (``HelperInterpBase::_compute_indices_min_size_weights_aa``):
  ``scale = in/out``; ``support = 2*scale`` if scale >= 1 else 2;
  ``K = ceil(support)*2 + 1``; ``center = scale*(i+0.5)``;
  ``xmin = max(int(center - support + 0.5), 0)``;
  ``xsize = clamp(min(int(center + support + 0.5), in) - xmin, 0, K)``;
  ``w_j = keys_cubic_a=-0.5((j + xmin - center + 0.5) * invscale)`` for j < xsize
  (``invscale = 1/scale`` if scale >= 1 else 1), normalised by their sequential sum;
* quantised to int16 with one precision per axis
  (``HelperInterpBase::_compute_index_ranges_int16_weights``): the largest
  ``p <= 22`` with ``int(0.5 + wt_max * 2**(p+1)) < 2**15`` (wt_max = max normalised
  weight over the whole axis); ``w_int = trunc(w*2**p +- 0.5)`` (round half away from 0);
* separable passes, horizontal (W) first, then vertical (H); each pass computes
  ``clamp((sum_k px * w_int + 2**(p-1)) >> p, 0, 255)`` in int32 and stores uint8;
  a pass is skipped when that axis keeps its size; same size on both -> copy.

Here the integer sums are evaluated with BLAS matrix products on (blocks of) the
banded int16 weight matrix, in float32 when every partial sum is provably an
integer below 2**24 (255 * sum|w_int| + 2**(p-1) < 2**24), else in float64
(< 2**53): products and sums of such integers are exact in any summation order,
so the result equals torch's int32 arithmetic bit for bit.

Paths in torch (2.13, x86): ``_upsample_bicubic2d_aa_kernel`` is registered with
REGISTER_DISPATCH, so the AVX512 slot is empty and AVX512 CPUs run the AVX2 kernel;
ATEN_CPU_CAPABILITY=default runs the generic separable kernel.  Both give the same
bytes (checked on 1,166 size/content cases and every one-axis pair up to 160 px)
except for two torch bugs, not reproduced here and out of reach of GLM's sizes
(multiples of 28): the generic kernel with an NCHW-contiguous input and out_w == 1
repeats output row 0, and the AVX2 kernel asserts for an NCHW input resized to 1x1.
"""

from __future__ import annotations

import math

import numpy as np

__all__ = ["resize_bicubic_aa_uint8", "aa_cubic_int16_weights"]

_A = -0.5  # Keys cubic, antialias=True (HelperInterpCubic::aa_filter<double, true>)


def _keys_cubic(x: np.ndarray) -> np.ndarray:
    """HelperInterpCubic::aa_filter with a = -0.5, evaluated op by op like the C++."""
    x = np.abs(x)
    # cubic_convolution1(x, A) = ((A + 2) * x - (A + 3)) * x * x + 1
    c1 = (((_A + 2.0) * x - (_A + 3.0)) * x) * x + 1.0
    # cubic_convolution2(x, A) = ((A * x - 5 * A) * x + 8 * A) * x - 4 * A
    c2 = ((_A * x - 5.0 * _A) * x + 8.0 * _A) * x - 4.0 * _A
    return np.where(x < 1.0, c1, np.where(x < 2.0, c2, 0.0))


def aa_cubic_int16_weights(in_size: int, out_size: int):
    """Return (xmin[out], xsize[out], w_int[out, K] as int64, precision) exactly as torch."""
    in_size = int(in_size)
    out_size = int(out_size)
    scale = float(in_size) / float(out_size)  # compute_scales_value<double>, no scale given
    interp_size = 4
    support = (interp_size * 0.5) * scale if scale >= 1.0 else interp_size * 0.5
    K = int(math.ceil(support)) * 2 + 1
    invscale = 1.0 / scale if scale >= 1.0 else 1.0

    i = np.arange(out_size, dtype=np.int64)
    center = scale * (i.astype(np.float64) + 0.5)
    # static_cast<int64_t> truncates toward zero, as does astype(np.int64)
    xmin = np.maximum((center - support + 0.5).astype(np.int64), 0)
    xsize = np.minimum((center + support + 0.5).astype(np.int64), in_size) - xmin
    xsize = np.clip(xsize, 0, K)

    w = np.zeros((out_size, K), dtype=np.float64)
    total = np.zeros(out_size, dtype=np.float64)
    for j in range(K):  # sequential accumulation, same order as the C++ loop
        valid = j < xsize
        xj = ((j + xmin).astype(np.float64) - center + 0.5) * invscale
        f = np.where(valid, _keys_cubic(xj), 0.0)
        w[:, j] = f
        total = total + f
    nz = total != 0.0
    w = np.where(nz[:, None], w / np.where(nz, total, 1.0)[:, None], w)
    wt_max_rows = np.where(nz, np.max(np.where(np.arange(K)[None, :] < xsize[:, None], w, 0.0), axis=1,
                                      initial=0.0), 0.0)
    wt_max = max(0.0, float(np.max(wt_max_rows, initial=0.0)))

    precision = 0
    while precision < 22:
        next_value = int(0.5 + wt_max * float(1 << (precision + 1)))
        if next_value >= (1 << 15):
            break
        precision += 1

    v = w * float(1 << precision)
    w_int = np.where(v < 0, np.trunc(-0.5 + v), np.trunc(0.5 + v)).astype(np.int64)
    # C++ stores (int) -> int16_t; values are in range by construction of `precision`
    w_int = w_int.astype(np.int16).astype(np.int64)
    w_int[np.arange(K)[None, :] >= xsize[:, None]] = 0
    return xmin, xsize, w_int, precision


def _dense_weight_matrix(in_size, out_size, xmin, xsize, w_int):
    m = np.zeros((in_size, out_size), dtype=np.float64)
    K = w_int.shape[1]
    o = np.arange(out_size)
    for k in range(K):
        sel = k < xsize
        m[xmin[sel] + k, o[sel]] = w_int[sel, k]
    return m


def _blocks(in_size, out_size, xmin, xsize, block):
    """Output blocks [o0, o1) with the input range [a, b) they read."""
    res = []
    lo = xmin
    hi = xmin + xsize
    for o0 in range(0, out_size, block):
        o1 = min(out_size, o0 + block)
        a = int(lo[o0:o1].min())
        b = int(hi[o0:o1].max())
        if b <= a:
            b = a + 1 if a < in_size else a
            a = b - 1
        res.append((o0, o1, a, b))
    return res


def _pick_block(in_size, out_size, K):
    # Output rows per dense block of the banded weight matrix. Small blocks keep the
    # wasted multiplications by zero low (window ~ block*scale + K); 16 was fastest here.
    if out_size <= 32:
        return out_size
    return 16


def _exact_dtype(w_int, precision):
    """float32 if every partial sum is an integer < 2**24 (exact), else float64 (< 2**53)."""
    bound = 255 * int(np.abs(w_int).sum(axis=1).max(initial=0)) + (1 << max(precision - 1, 0))
    return np.float32 if bound < (1 << 24) else np.float64


class _AxisPlan:
    def __init__(self, in_size, out_size):
        self.xmin, self.xsize, self.w_int, self.precision = aa_cubic_int16_weights(in_size, out_size)
        self.dtype = _exact_dtype(self.w_int, self.precision)
        self.m = _dense_weight_matrix(in_size, out_size, self.xmin, self.xsize, self.w_int).T.copy()  # (out, in)
        blk = _pick_block(in_size, out_size, self.w_int.shape[1])
        self.blocks = _blocks(in_size, out_size, self.xmin, self.xsize, blk)
        self.in_size = in_size
        self.out_size = out_size
        self.set_dtype(self.dtype)

    def set_dtype(self, dt):
        self.dtype = dt
        self.mt = self.m.astype(dt)
        self.half = dt(float(1 << (self.precision - 1)) if self.precision > 0 else 0.0)
        self.inv = dt(1.0 / float(1 << self.precision))

    def apply(self, x2d, out):
        """out (out_size, N) = clamp((W_int @ x2d + 2**(p-1)) >> p, 0, 255); x2d (in_size, N)."""
        for o0, o1, a, b in self.blocks:
            np.matmul(self.mt[o0:o1, a:b], x2d[a:b], out=out[o0:o1])
        # (acc + 2**(p-1)) >> p  (floor; exact), then saturate like packs_epi32/packus_epi16
        out += self.half
        out *= self.inv
        np.floor(out, out=out)
        np.clip(out, 0.0, 255.0, out=out)
        return out


def resize_bicubic_aa_uint8(frames: np.ndarray, out_h: int, out_w: int,
                            work_bytes: int = 1 << 20) -> np.ndarray:
    """Bit-exact numpy equivalent of torchvision v2 ``resize(..., BICUBIC, antialias=True)``
    on a CPU uint8 tensor (torch's uint8 ``_upsample_bicubic2d_aa`` kernel).

    frames: (..., H, W, C) uint8, channels last (typically (T, H, W, 3)).
    Returns a new (..., out_h, out_w, C) uint8 array.  If (out_h, out_w) == (H, W)
    the input array itself is returned untouched (torchvision returns its input
    tensor object in that case).

    Speed note: the work is many small BLAS calls; multi-threaded OpenBLAS can be
    much slower than one thread for that on a busy machine (OPENBLAS_NUM_THREADS=1).
    """
    frames = np.asarray(frames)
    if frames.dtype != np.uint8:
        raise TypeError("frames must be uint8")
    if frames.ndim < 3:
        raise ValueError("frames must be (..., H, W, C)")
    out_h = int(out_h)
    out_w = int(out_w)
    if out_h <= 0 or out_w <= 0:
        raise ValueError("output size must be positive")
    *lead, H, W, C = frames.shape
    if (out_h, out_w) == (H, W):
        return frames
    lead = tuple(lead)
    T = int(np.prod(lead)) if lead else 1
    if T * H * W * C == 0:
        return np.zeros(lead + (out_h, out_w, C), dtype=np.uint8)
    x = np.ascontiguousarray(frames).reshape(T, H, W * C)

    hplan = _AxisPlan(W, out_w) if out_w != W else None
    vplan = _AxisPlan(H, out_h) if out_h != H else None
    plans = [p for p in (hplan, vplan) if p is not None]
    dt = np.float64 if any(p.dtype == np.float64 for p in plans) else np.float32
    for p in plans:
        if p.dtype != dt:
            p.set_dtype(dt)
    isz = np.dtype(dt).itemsize

    result = np.empty((T, out_h, out_w * C), dtype=np.uint8)
    # frames per chunk (the float intermediate (n, H, out_w*C) stays a few MB)
    n = max(1, min(T, (8 * work_bytes) // max(1, isz * H * max(W, out_w) * C)))
    inter = np.empty((n, H, out_w * C), dtype=dt)
    if hplan is not None:
        m_rows = max(1, work_bytes // (isz * W * C))       # image rows per horizontal sub-chunk
        hin = np.empty((W * C, m_rows), dtype=dt)
        hout = np.empty((out_w * C, m_rows), dtype=dt)
    if vplan is not None:
        cc = max(1, work_bytes // (isz * H))                 # columns per vertical sub-chunk
        vout = np.empty((out_h, min(cc, out_w * C)), dtype=dt)
    for t0 in range(0, T, n):
        t1 = min(T, t0 + n)
        k = t1 - t0
        rows = x[t0:t1].reshape(k * H, W * C)
        it = inter[:k].reshape(k * H, out_w * C)
        if hplan is not None:
            for r0 in range(0, k * H, m_rows):
                r1 = min(k * H, r0 + m_rows)
                m = r1 - r0
                xi = hin[:, :m]
                xi[...] = rows[r0:r1].T                       # (W*C, m): row w*C + c
                # contiguous work arrays for the product (W, C*m) -> (out_w, C*m)
                src = xi if m == m_rows else np.ascontiguousarray(xi)
                dst = hout if m == m_rows else np.empty((out_w * C, m), dtype=dt)
                hplan.apply(src.reshape(W, C * m), dst.reshape(out_w, C * m))
                it[r0:r1] = dst.T                             # back to (m, out_w*C)
        else:
            it[...] = rows
        if vplan is not None:
            N = out_w * C
            res = result[t0:t1]
            for f in range(k):
                fr = inter[f]                                 # (H, N)
                for c0 in range(0, N, cc):
                    c1 = min(N, c0 + cc)
                    vo = vout[:, : c1 - c0]
                    vplan.apply(fr[:, c0:c1], vo)
                    res[f, :, c0:c1] = vo
        else:
            result[t0:t1] = inter[:k]
    return result.reshape(lead + (out_h, out_w, C))
