"""Fused CPU kernels of the streaming estimator (numba), beside its torch reference.

Why: discovery runs the estimator inside the forward pass, on every layer of every step.
On CPU the torch formulation costs 22-26 ns per pre-activation value on this 2-core
machine: float64 copies and five reductions for the moments, an asinh of the whole batch,
a transposed copy and an int64 ``scatter_add_`` for the counts. That is as much as the
model's own MLP GEMMs: an observed pass ran at 0.35-0.49 of a plain one (SmolLM2-135M,
bench/discovery_speed.py). These kernels read each value once (twice while the grid is not
set yet), keep a block of neurons' accumulators in vector registers, find bins by table
lookup instead of an asinh, and run on every core torch uses, each thread on its own range
of neurons: 1.7-2.8 ns per value, 0.81-0.84 of a plain forward.

They compute the same statistics as :class:`~vllm_negablate.discovery.streaming.StreamingW1Estimator`'s
torch path (``kernel="torch"``, which stays the reference and the only path for CUDA
tensors):

* :func:`shifted_power_sums`: per neuron, ``sum (x - a)^p`` for ``p = 1..4`` in float64
  around a shift ``a`` (the running mean), plus min, max and whether every value is
  finite. The caller turns them into central moments (:func:`central_from_shifted`) and
  merges them exactly as before; with ``a`` near the mean there is no cancellation.
* :func:`add_bin_counts`: the asinh-grid bin of every value, added to the counts. The bin
  is found against the grid edges rounded to float32 (:func:`bin_tables`), the torch path
  computes an asinh in float32: a value within ~1e-7 of an edge may land one bin over, a
  few per million, far below the histogram's resolution.
* :func:`sums_and_bin_counts`: both in one read of the batch, once the grid is set (most
  of discovery); a batch found non-finite is taken back out (:func:`remove_bin_counts`).
* :func:`bin_values`: the same lookup for a flat array of values (the finalize step places
  16-bit lattice points with it, so it agrees with the counts bin for bin).

numba is a dependency of vLLM (CPU and GPU builds), so it is there whenever the plugin
runs; :func:`available` says whether it imported.
"""

from __future__ import annotations

import functools
import os
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np

try:  # pragma: no cover - exercised wherever vLLM is installed
    import numba
    from numba import njit, types
    from numba.extending import overload

    _NUMBA_ERROR: str | None = None
except Exception as exc:  # pragma: no cover - numba missing or broken
    numba = None
    _NUMBA_ERROR = f"{type(exc).__name__}: {exc}"

__all__ = [
    "available",
    "unavailable_reason",
    "kernel_input",
    "shifted_power_sums",
    "central_from_shifted",
    "add_bin_counts",
    "remove_bin_counts",
    "sums_and_bin_counts",
    "bin_values",
]

# Neurons per block: the block's counts (BLOCK * (nbins + 2) * 4 bytes, 131 KiB at 2,048
# bins) stay in L2 while the block's rows stream through.
_BLOCK = 16


def available() -> bool:
    """Whether the numba kernels can run in this process."""
    return numba is not None


def unavailable_reason() -> str | None:
    return _NUMBA_ERROR


# Bin lookup: the bin of a standardized value y is the number of grid edges <= y, the grid
# edges being float32(sinh(-u_max + j * du)), j = 0..nbins (0: underflow, nbins + 1:
# overflow), exactly the asinh formula's bins up to the float32 rounding of an edge. A table
# indexed by y's sign, exponent and top _TABLE_MANTISSA_BITS mantissa bits gives the bin of
# the smallest value of y's cell; a cell spans less than one bin (2^-7 relative width),
# so at most one more edge comparison finishes it. No transcendental per value.
_TABLE_MANTISSA_BITS = 7
_TABLE_SHIFT = 23 - _TABLE_MANTISSA_BITS
# y is clamped to the finite float32 range: a product that overflows lands in the
# under/overflow bin instead of past the last edge (+inf)
_FLT_MAX = np.float32(np.finfo(np.float32).max)


@functools.lru_cache(maxsize=8)
def bin_tables(u_max: float, du: float, nbins: int) -> tuple[np.ndarray, np.ndarray, int]:
    """``(table, edges, steps)`` for :func:`add_bin_counts` and :func:`bin_values`:
    ``edges`` float32 ``[nbins + 2]`` (the ``nbins + 1`` grid edges and ``+inf``), ``table``
    int32 ``[2^(9 + bits)]``, the bin of each float32 cell's smallest value, and ``steps``,
    the most edges inside one cell (the edge tests a lookup needs; 1 for the default grid).
    Cached: every layer's estimator (and every discovery pass) shares one read-only copy."""
    edges = np.empty(nbins + 2, dtype=np.float32)
    edges[:-1] = np.sinh(-u_max + du * np.arange(nbins + 1, dtype=np.float64))
    edges[-1] = np.inf
    keys = np.arange(1 << (9 + _TABLE_MANTISSA_BITS), dtype=np.uint64)
    low = (keys << np.uint64(_TABLE_SHIFT)).astype(np.uint32)
    high = low | np.uint32((1 << _TABLE_SHIFT) - 1)
    negative = keys >= (1 << (8 + _TABLE_MANTISSA_BITS))
    # negative floats: larger bit patterns are more negative, so a cell's minimum is its top
    cell_min = np.where(negative, high, low).view(np.float32)
    with np.errstate(invalid="ignore"):
        table = np.searchsorted(edges[:-1], cell_min, side="right")
    table[np.isnan(cell_min)] = 0  # NaN cells never occur (values are checked finite)
    cell_max = np.where(negative, low, high).view(np.float32)
    with np.errstate(invalid="ignore"):
        spans = np.searchsorted(edges[:-1], cell_max, side="right") - table
    spans[np.isnan(cell_max) | np.isnan(cell_min)] = 0
    table = table.astype(np.int32)
    table.flags.writeable = edges.flags.writeable = False
    return table, edges, max(1, int(spans.max()))


if numba is not None:

    # reassoc/contract let LLVM vectorize across the block's neurons (each neuron's sums
    # still run over the tokens in order); no nnan/ninf: non-finite values must propagate.
    _FAST = {"reassoc", "contract", "nsz"}

    def _load_row(row, n, out):  # pragma: no cover - replaced by the overload below
        raise NotImplementedError

    @overload(_load_row, inline="always")
    def _load_row_impl(row, n, out):  # pragma: no cover - compiled
        """``out[:n] = row[:n]`` as float32; a uint16 row holds bfloat16 bit patterns (the
        top half of a float32), so a bf16 batch is read as it is, never copied."""
        if isinstance(row.dtype, types.Integer):

            def impl(row, n, out):
                bits = out.view(np.uint32)
                for i in range(n):
                    bits[i] = np.uint32(row[i]) << np.uint32(16)

            return impl

        def impl(row, n, out):
            for i in range(n):
                out[i] = row[i]

        return impl

    @njit(nogil=True, cache=True, fastmath=_FAST)
    def _power_sums(lo_j, hi_j, x, shift, s1, s2, s3, s4, lo, hi):  # pragma: no cover
        t_count = x.shape[0]
        for j0 in range(lo_j, hi_j, _BLOCK):
            n = min(hi_j, j0 + _BLOCK) - j0
            acc = np.zeros((4, _BLOCK))
            mn = np.full(_BLOCK, np.inf)
            mx = np.full(_BLOCK, -np.inf)
            sh = np.zeros(_BLOCK)
            vals = np.empty(_BLOCK, dtype=np.float32)
            for i in range(n):
                sh[i] = shift[j0 + i]
            for t in range(t_count):
                _load_row(x[t, j0 : j0 + n], n, vals)
                for i in range(n):
                    v = np.float64(vals[i])
                    d = v - sh[i]
                    d2 = d * d
                    acc[0, i] += d
                    acc[1, i] += d2
                    acc[2, i] += d2 * d
                    acc[3, i] += d2 * d2
                    mn[i] = min(mn[i], v)
                    mx[i] = max(mx[i], v)
            for i in range(n):
                s1[j0 + i] = acc[0, i]
                s2[j0 + i] = acc[1, i]
                s3[j0 + i] = acc[2, i]
                s4[j0 + i] = acc[3, i]
                lo[j0 + i] = mn[i]
                hi[j0 + i] = mx[i]

    @njit(inline="always")
    def _bins_of_block(y, y_bits, n, table, edges, steps, bins):  # pragma: no cover
        # the table gives the bin of the cell's smallest value; `steps` more edge tests
        # (1 for the default grid) finish it; branch-free, so the loops vectorize
        for i in range(n):
            bins[i] = table[y_bits[i] >> _TABLE_SHIFT]
        for _ in range(steps):
            for i in range(n):
                bins[i] += 1 if y[i] >= edges[bins[i]] else 0

    @njit(nogil=True, cache=True)
    def _bin_counts(lo_j, hi_j, x, center, inv, table, edges, steps, delta, hist):  # pragma: no cover
        t_count = x.shape[0]
        y = np.empty(_BLOCK, dtype=np.float32)
        y_bits = y.view(np.uint32)
        bins = np.empty(_BLOCK, dtype=np.int64)
        cen = np.zeros(_BLOCK, dtype=np.float32)
        scale = np.zeros(_BLOCK, dtype=np.float32)
        vals = np.empty(_BLOCK, dtype=np.float32)
        for j0 in range(lo_j, hi_j, _BLOCK):
            n = min(hi_j, j0 + _BLOCK) - j0
            for i in range(n):
                cen[i] = center[j0 + i]
                scale[i] = inv[j0 + i]
            for t in range(t_count):
                _load_row(x[t, j0 : j0 + n], n, vals)
                for i in range(n):  # float32, as the torch path: (x - c) * inv
                    y[i] = min(max((vals[i] - cen[i]) * scale[i], -_FLT_MAX), _FLT_MAX)
                _bins_of_block(y, y_bits, n, table, edges, steps, bins)
                for i in range(n):
                    hist[j0 + i, bins[i]] += delta

    @njit(nogil=True, cache=True, fastmath=_FAST)
    def _sums_and_bins(lo_j, hi_j, x, shift, center, inv, table, edges, steps, hist,
                       s1, s2, s3, s4, lo, hi):  # pragma: no cover - compiled
        # _power_sums and _bin_counts in one read of the batch
        t_count = x.shape[0]
        y = np.empty(_BLOCK, dtype=np.float32)
        y_bits = y.view(np.uint32)
        bins = np.empty(_BLOCK, dtype=np.int64)
        vals = np.empty(_BLOCK, dtype=np.float32)
        for j0 in range(lo_j, hi_j, _BLOCK):
            n = min(hi_j, j0 + _BLOCK) - j0
            acc = np.zeros((4, _BLOCK))
            mn = np.full(_BLOCK, np.inf)
            mx = np.full(_BLOCK, -np.inf)
            sh = np.zeros(_BLOCK)
            cen = np.zeros(_BLOCK, dtype=np.float32)
            scale = np.zeros(_BLOCK, dtype=np.float32)
            for i in range(n):
                sh[i] = shift[j0 + i]
                cen[i] = center[j0 + i]
                scale[i] = inv[j0 + i]
            for t in range(t_count):
                _load_row(x[t, j0 : j0 + n], n, vals)
                for i in range(n):
                    v = np.float64(vals[i])
                    d = v - sh[i]
                    d2 = d * d
                    acc[0, i] += d
                    acc[1, i] += d2
                    acc[2, i] += d2 * d
                    acc[3, i] += d2 * d2
                    mn[i] = min(mn[i], v)
                    mx[i] = max(mx[i], v)
                    y[i] = min(max((vals[i] - cen[i]) * scale[i], -_FLT_MAX), _FLT_MAX)
                _bins_of_block(y, y_bits, n, table, edges, steps, bins)
                for i in range(n):
                    hist[j0 + i, bins[i]] += 1
            for i in range(n):
                s1[j0 + i] = acc[0, i]
                s2[j0 + i] = acc[1, i]
                s3[j0 + i] = acc[2, i]
                s4[j0 + i] = acc[3, i]
                lo[j0 + i] = mn[i]
                hi[j0 + i] = mx[i]

    @njit(nogil=True, cache=True)
    def _bin_flat(lo_i, hi_i, v, center, inv, table, edges, steps, out):  # pragma: no cover
        y = np.empty(_BLOCK, dtype=np.float32)
        y_bits = y.view(np.uint32)
        bins = np.empty(_BLOCK, dtype=np.int64)
        for i0 in range(lo_i, hi_i, _BLOCK):
            n = min(hi_i, i0 + _BLOCK) - i0
            for i in range(n):
                y[i] = min(max((v[i0 + i] - center[i0 + i]) * inv[i0 + i], -_FLT_MAX), _FLT_MAX)
            _bins_of_block(y, y_bits, n, table, edges, steps, bins)
            for i in range(n):
                out[i0 + i] = bins[i]


# Parallelism: the kernels release the GIL and each takes a range of neurons; a small pool
# of plain threads runs the ranges. Not numba's parallel=True: its OpenMP layer shares
# libgomp with vLLM's CPU kernels and, inside a vLLM worker whose OpenMP threads are bound
# to cores, changed the thread count vLLM's attention checks ("Check failed:
# input->metadata->thread_num == thread_num (2 vs. 1)").
#
# Placement: a vLLM CPU worker binds its OpenMP threads one per core (GOMP_CPU_AFFINITY),
# the main thread included, and a thread inherits its creator's binding, so a plain pool
# thread would share the main thread's core (measured: no speed-up at all). Each pool
# thread moves itself to the cores the process's other threads are bound to.
_POOL: ThreadPoolExecutor | None = None
_POOL_LOCK = threading.Lock()


def _pool_cores() -> set[int]:
    """Cores for the pool: those any thread of this process may use, but the calling
    (main) thread's own when there are others (else all of them)."""
    mine = set(os.sched_getaffinity(0))
    cores = set(mine)
    try:
        for tid in os.listdir("/proc/self/task"):
            cores |= os.sched_getaffinity(int(tid))
    except OSError:  # not Linux, or a thread ended while we looked
        pass
    return (cores - mine) or cores


def _place_pool_thread(cores: set[int]) -> None:
    try:
        os.sched_setaffinity(0, cores)  # 0: the calling thread
    except OSError:
        pass


def _thread_count() -> int:
    """As many threads as torch uses (a TP rank bound to one core keeps to one)."""
    import torch

    return max(1, torch.get_num_threads())


def _run_split(kernel, size: int, *args) -> None:
    """``kernel(lo, hi, *args)`` over ``[0, size)`` cut into one range per thread (block
    aligned); the calling thread runs the first range itself."""
    global _POOL
    parts = min(_thread_count(), max(1, size // (4 * _BLOCK)))
    if parts == 1:
        kernel(0, size, *args)
        return
    step = -(-size // parts)
    step = -(-step // _BLOCK) * _BLOCK
    bounds = [(lo, min(size, lo + step)) for lo in range(0, size, step)]
    with _POOL_LOCK:
        if _POOL is None or _POOL._max_workers < len(bounds) - 1:
            cores = _pool_cores() if hasattr(os, "sched_setaffinity") else None
            _POOL = ThreadPoolExecutor(
                max_workers=len(bounds) - 1, thread_name_prefix="negablate-w1",
                initializer=_place_pool_thread if cores else None,
                initargs=(cores,) if cores else (),
            )
        pool = _POOL
    futures = [pool.submit(kernel, lo, hi, *args) for lo, hi in bounds[1:]]
    kernel(*bounds[0], *args)
    for f in futures:
        f.result()


def kernel_input(x) -> tuple[np.ndarray, int]:
    """A CPU tensor ``[T, K]`` as the kernels read it: ``(array, K)``, the array C-contiguous
    ``[T, W >= K]`` whose first ``K`` columns are ``x``. float32 is read as it is, bfloat16
    as its uint16 bit patterns, other dtypes are converted to float32. vLLM's gate is a
    column slice of the fused gate/up output: it is read in place through the full rows
    (numba vectorizes unit-stride rows only; a strided view ran ~3x slower)."""
    import torch

    x = x.detach()
    k = int(x.shape[1])
    if x.dtype not in (torch.float32, torch.bfloat16):
        x = x.to(torch.float32)
    if x.stride(1) != 1 or x.stride(0) < k:
        x = x.contiguous()
    elif x.stride(0) != k:
        try:  # the full rows the slice lives in (fails if they run past the storage)
            x = x.as_strided((x.shape[0], x.stride(0)), (x.stride(0), 1))
        except RuntimeError:
            x = x.contiguous()
    if x.dtype == torch.bfloat16:
        return x.view(torch.int16).numpy().view(np.uint16), k
    return x.numpy(), k


def shifted_power_sums(x: tuple[np.ndarray, int], shift: np.ndarray):
    """Per column of ``x`` (:func:`kernel_input`): ``(s1, s2, s3, s4, min, max, finite)``
    with ``s_p = sum_t (x - shift)^p`` in float64 (``shift`` float64 ``[K]``).

    ``finite`` needs no test per value: a NaN or an infinity makes ``s4`` non-finite, and
    finite float32 values cannot overflow it (``(2 * 3.4e38)^4 * 2^31 < 1.8e308``)."""
    x, k = x
    out = [np.empty(k, dtype=np.float64) for _ in range(6)]
    _run_split(_power_sums, k, x, shift, *out)
    return (*out, bool(np.isfinite(out[3]).all()))


def central_from_shifted(n: int, shift: np.ndarray, s1, s2, s3, s4):
    """``(mean, M2, M3, M4)`` of a batch of ``n`` values from its power sums around
    ``shift`` (``M_p`` = sum of ``(x - mean)^p``, what the estimator merges)."""
    d = s1 / n
    d2 = d * d
    mean = shift + d
    m2 = s2 - n * d2
    m3 = s3 - 3.0 * d * s2 + 2.0 * n * d2 * d
    m4 = s4 - 4.0 * d * s3 + 6.0 * d2 * s2 - 3.0 * n * d2 * d2
    return mean, np.maximum(m2, 0.0), m3, m4


def add_bin_counts(x: tuple[np.ndarray, int], center: np.ndarray, inv: np.ndarray,
                   tables: tuple[np.ndarray, np.ndarray, int], hist: np.ndarray) -> None:
    """Add the bins of ``x`` (:func:`kernel_input`) to ``hist [K, nbins + 2]`` in place;
    ``center`` and ``inv`` float32 ``[K]``, ``tables`` from :func:`bin_tables`."""
    x, k = x
    _run_split(_bin_counts, k, x, center, inv, *tables, 1, hist)


def remove_bin_counts(x: tuple[np.ndarray, int], center: np.ndarray, inv: np.ndarray,
                      tables: tuple[np.ndarray, np.ndarray, int], hist: np.ndarray) -> None:
    """Undo :func:`add_bin_counts` (or the counting of :func:`sums_and_bin_counts`) of the
    same batch: binning is deterministic, so the counts are restored exactly."""
    x, k = x
    _run_split(_bin_counts, k, x, center, inv, *tables, -1, hist)


def sums_and_bin_counts(x: tuple[np.ndarray, int], shift: np.ndarray, center: np.ndarray,
                        inv: np.ndarray, tables: tuple[np.ndarray, np.ndarray, int],
                        hist: np.ndarray):
    """:func:`shifted_power_sums` and :func:`add_bin_counts` in one read of the batch (the
    once-binned batch's layout: most of discovery). If ``finite`` comes back False the
    counts already hold the batch's bins: :func:`remove_bin_counts` takes them out."""
    x, k = x
    out = [np.empty(k, dtype=np.float64) for _ in range(6)]
    _run_split(_sums_and_bins, k, x, shift, center, inv, *tables, hist, *out)
    return (*out, bool(np.isfinite(out[3]).all()))


def bin_values(v: np.ndarray, center: np.ndarray, inv: np.ndarray,
               tables: tuple[np.ndarray, np.ndarray, int]) -> np.ndarray:
    """Bin index (``0 .. nbins + 1``, under/overflow at the ends) of each value of ``v``,
    with its own ``center`` and ``inv`` scale (all flat float32, same length)."""
    out = np.empty(v.shape[0], dtype=np.int64)
    if v.shape[0]:
        _run_split(_bin_flat, v.shape[0], v, center, inv, *tables, out)
    return out
