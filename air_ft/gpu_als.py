"""AIR's ALS sweep on a GPU: Triton kernels, no host synchronization inside the sweep, optional CUDA graphs.

The sweep (Eqs. 5-6, :func:`air_ft.linalg.als_sweep`) is memory-bound: every rank step reads the residual ``R``
and the weights ``C`` (``m x n`` each) and rewrites ``R``. The torch reference makes about nine passes over them
per step; here a step is two kernels:

- ``_b_kernel``: ``b = colsum / den_r`` (Eq. 5) from the per-program column partial sums of the previous kernel;
  stored in ``VS[r]``, the partial sums zeroed for the next step.
- ``_step_kernel``: persistent programs over row blocks. For each block: ``u~_i = sum_j C_ij E_ij b_j /
  sum_j C_ij b_j^2`` (Eq. 6, one read of the rows), then, re-reading the same rows while they are in cache,
  ``R = E - u~ b^T + u_{r-1} v_{r-1}^T`` (the downdate of step ``r`` and the add-back of component ``r-1``) and
  this program's share of the column sums of step ``r-1``.

The state layout and the order of the updates are those of the C kernel (``csrc/als_sweep.c``): ``US`` (k x m) and
``VS`` (k x n) rows with sigma folded in, ``den`` (k x n) Eq. 5's denominators. A sweep launches ``2k + 1``
kernels from Python without reading anything back; with ``graphs`` the launches of a sweep are recorded once per
matrix shape as a CUDA graph and replayed for every later matrix of that shape (a 7B model has three shapes).
The first use in a process checks the kernels against the torch reference on a small problem; if they disagree
or do not compile, :func:`air_ft.linalg.triton_available` says so and ``auto`` uses the torch path.
"""

from __future__ import annotations

import os

import torch

__all__ = ["build", "checked", "error", "record_check", "sweep", "usable", "warn_fallback"]

_state: dict = {"checked": None, "error": None, "graphs": {}}
MAX_GRAPHS = 4  # recorded sweeps kept (a model has about three matrix shapes)


def _triton():
    import triton
    import triton.language as tl

    return triton, tl


def _kernels():
    if "kernels" in _state:
        return _state["kernels"]
    triton, tl = _triton()

    @triton.jit
    def _b_kernel(acc, den, vs, n, r, nprog, BN: tl.constexpr):
        cols = tl.program_id(0) * BN + tl.arange(0, BN)
        mask = cols < n
        s = tl.zeros((BN,), dtype=tl.float32)
        for p in range(0, nprog):
            s += tl.load(acc + p * n + cols, mask=mask, other=0.0)
            tl.store(acc + p * n + cols, tl.zeros((BN,), dtype=tl.float32), mask=mask)
        d = tl.load(den + r * n + cols, mask=mask, other=1.0)
        tl.store(vs + r * n + cols, s / d, mask=mask)

    @triton.jit
    def _step_kernel(resid, c, us, vs, acc, m, n, r, r_next, tiny,
                     DO_U: tl.constexpr, HAS_NEXT: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr):
        pid = tl.program_id(0)
        nprog = tl.num_programs(0)
        nblocks = tl.cdiv(m, BM)
        for blk in range(pid, nblocks, nprog):
            rows = blk * BM + tl.arange(0, BM)
            rmask = rows < m
            u = tl.zeros((BM,), dtype=tl.float32)
            if DO_U:  # Eq. 6 for these rows, with b = VS[r] from _b_kernel
                num = tl.zeros((BM,), dtype=tl.float32)
                dd = tl.zeros((BM,), dtype=tl.float32)
                for j0 in range(0, n, BN):
                    cols = j0 + tl.arange(0, BN)
                    cmask = cols < n
                    mask = rmask[:, None] & cmask[None, :]
                    offs = rows[:, None] * n + cols[None, :]
                    e = tl.load(resid + offs, mask=mask, other=0.0)
                    w = tl.load(c + offs, mask=mask, other=0.0)
                    b = tl.load(vs + r * n + cols, mask=cmask, other=0.0)
                    num += tl.sum(w * e * b[None, :], axis=1)
                    dd += tl.sum(w * (b * b)[None, :], axis=1)
                u = num / tl.maximum(dd, tiny)
                tl.store(us + r * m + rows, u, mask=rmask)
            a = tl.zeros((BM,), dtype=tl.float32)
            if HAS_NEXT:
                a = tl.load(us + r_next * m + rows, mask=rmask, other=0.0)
            for j0 in range(0, n, BN):
                cols = j0 + tl.arange(0, BN)
                cmask = cols < n
                mask = rmask[:, None] & cmask[None, :]
                offs = rows[:, None] * n + cols[None, :]
                e = tl.load(resid + offs, mask=mask, other=0.0)
                if DO_U:
                    b = tl.load(vs + r * n + cols, mask=cmask, other=0.0)
                    e = e - u[:, None] * b[None, :]
                if HAS_NEXT:  # add back component r-1 (VS[r-1] still holds its old v) and its Eq. 5 sums
                    v = tl.load(vs + r_next * n + cols, mask=cmask, other=0.0)
                    e = e + a[:, None] * v[None, :]
                    w = tl.load(c + offs, mask=mask, other=0.0)
                    part = tl.sum(w * e * a[:, None], axis=0)
                    prev = tl.load(acc + pid * n + cols, mask=cmask, other=0.0)
                    tl.store(acc + pid * n + cols, prev + part, mask=cmask)
                tl.store(resid + offs, e, mask=mask)

    _state["kernels"] = (_b_kernel, _step_kernel)
    return _state["kernels"]


def usable(*tensors: torch.Tensor) -> bool:
    """The kernels handle these tensors: float32 on a CUDA device (or on the CPU under ``TRITON_INTERPRET=1``)."""
    interp = os.environ.get("TRITON_INTERPRET", "") == "1"
    return all(t.dtype == torch.float32 and (t.device.type == "cuda" or (interp and t.device.type == "cpu"))
               for t in tensors)


def _programs(m: int, device: torch.device, bm: int) -> int:
    blocks = -(-m // bm)
    if device.type != "cuda":
        return min(blocks, 4)
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    return min(blocks, 2 * sms)


def _launch_sweep(resid, c, us, vs, den, acc, tiny: float, bm: int, bn: int, bnb: int) -> None:
    b_kernel, step_kernel = _kernels()
    (m, n), k = resid.shape, us.shape[0]
    nprog = acc.shape[0]
    grid_b = (-(-n // bnb),)
    step_kernel[(nprog,)](resid, c, us, vs, acc, m, n, 0, k - 1, tiny, DO_U=False, HAS_NEXT=True, BM=bm, BN=bn)
    for r in range(k - 1, -1, -1):
        b_kernel[grid_b](acc, den, vs, n, r, nprog, BN=bnb)
        step_kernel[(nprog,)](resid, c, us, vs, acc, m, n, r, max(r - 1, 0), tiny, DO_U=True, HAS_NEXT=r > 0,
                              BM=bm, BN=bn)


def sweep(resid: torch.Tensor, c: torch.Tensor, us: torch.Tensor, vs: torch.Tensor, den: torch.Tensor,
          graphs: bool = True, bm: int = 2, bn: int = 512) -> None:
    """One backward sweep in place on ``resid`` (m x n), ``us`` (k x m), ``vs`` (k x n); ``den`` (k x n) holds
    Eq. 5's denominators for the entering ``us``. Same contract as :func:`air_ft.native.sweep` without tracking.

    ``graphs``: record the sweep's launches as a CUDA graph for this shape on first use and replay it afterwards
    (inputs are copied into the graph's buffers: two extra passes over ``R`` and ``C`` per sweep instead of
    ``2k + 1`` Python launches).
    """
    for name, t in (("resid", resid), ("c", c), ("us", us), ("vs", vs), ("den", den)):
        if t.dtype != torch.float32 or not t.is_contiguous():
            raise ValueError(f"{name}: the Triton ALS kernels need contiguous float32 tensors, got {t.dtype} "
                             f"(contiguous: {t.is_contiguous()})")
    (m, n), k = resid.shape, us.shape[0]
    tiny = torch.finfo(torch.float32).tiny
    bnb = 256
    nprog = _programs(m, resid.device, bm)
    if not graphs or resid.device.type != "cuda":
        acc = torch.zeros(nprog, n, dtype=torch.float32, device=resid.device)
        _launch_sweep(resid, c, us, vs, den, acc, tiny, bm, bn, bnb)
        return
    key = (m, n, k, resid.device.index, bm, bn)
    entry = _state["graphs"].get(key)
    if entry is None:  # run eagerly once (compiles the kernels), then record the launches on static buffers
        acc = torch.zeros(nprog, n, dtype=torch.float32, device=resid.device)
        _launch_sweep(resid, c, us, vs, den, acc, tiny, bm, bn, bnb)
        bufs = {name: t.clone() for name, t in (("resid", resid), ("c", c), ("us", us), ("vs", vs), ("den", den))}
        bufs["acc"] = torch.zeros_like(acc)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            _launch_sweep(bufs["resid"], bufs["c"], bufs["us"], bufs["vs"], bufs["den"], bufs["acc"], tiny, bm, bn,
                          bnb)
        while len(_state["graphs"]) >= MAX_GRAPHS:  # each holds R- and C-sized buffers: keep the newest few
            _state["graphs"].pop(next(iter(_state["graphs"])))
        _state["graphs"][key] = (graph, bufs)
        return
    graph, bufs = entry
    for name, t in (("resid", resid), ("c", c), ("us", us), ("vs", vs), ("den", den)):
        bufs[name].copy_(t)
    bufs["acc"].zero_()
    graph.replay()
    for name, t in (("resid", resid), ("us", us), ("vs", vs)):
        t.copy_(bufs[name])


def record_check(ok: bool, error: str | None) -> bool:
    """Record the outcome of the one-time check against the torch reference (``linalg.triton_available``)."""
    _state["checked"], _state["error"] = bool(ok), error
    return bool(ok)


def checked() -> bool | None:
    """The recorded outcome of that check (``None``: not checked yet in this process)."""
    return _state["checked"]


def error() -> str | None:
    """Why the kernels are unavailable, if the check failed."""
    return _state["error"]


def build() -> None:
    """Import Triton (raises ImportError where it is missing); the kernels compile on their first launch."""
    _triton()


def warn_fallback() -> None:
    import warnings

    if not _state.get("warned"):
        _state["warned"] = True
        warnings.warn(f"AIR's Triton ALS kernels are unavailable, using the slower torch path: {_state['error']}",
                      stacklevel=3)
