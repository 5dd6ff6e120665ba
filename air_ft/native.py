"""The fused CPU kernel of AIR's ALS sweep (``csrc/als_sweep.c``), compiled on first use and cached.

torch has no single op for a rank step of Eqs. 5-6, so the reference path (:func:`air_ft.linalg.als_sweep` with
``backend="torch"``) makes about nine passes over the ``m x n`` residual and weights per step. The C kernel makes
one, with the rows split over threads. It is built with the system C compiler (``$CC`` or ``cc``) for this CPU
(``-march=native``), cached under ``$AIR_FT_CACHE/kernels`` keyed by source, compiler and CPU, and loaded with
:mod:`ctypes` (no Python headers, no pickles; ctypes releases the GIL during the call). Without a working compiler
``backend="auto"`` falls back to torch with a one-time warning.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import warnings
from pathlib import Path

import torch

from air_ft.assets import cache_root
from air_ft.errors import NativeUnavailable
from air_ft.files import atomic_file

SOURCE = Path(__file__).parent / "csrc" / "als_sweep.c"
_FLAGS = [["-O3", "-march=native", "-fopenmp-simd"], ["-O3", "-fopenmp-simd"], ["-O3"]]
_lib: ctypes.CDLL | None = None
_error: str | None = None


def _cpu_id() -> str:
    try:
        text = Path("/proc/cpuinfo").read_text()
        flags = next((ln for ln in text.splitlines() if ln.startswith(("flags", "Features"))), "")
        model = next((ln for ln in text.splitlines() if ln.startswith("model name")), "")
        return model + flags
    except OSError:
        return platform.processor() + platform.machine()


class _CompileFailed(Exception):
    """One set of compiler flags failed; the next set is tried."""


def _compile(cc: str, out: Path) -> None:
    errors = []
    for flags in _FLAGS:
        try:
            with atomic_file(out) as so:  # a concurrent process sees a whole library or none
                cmd = [cc, *flags, "-fPIC", "-shared", "-o", str(so), str(SOURCE), "-lpthread"]
                proc = subprocess.run(cmd, capture_output=True, text=True)
                if proc.returncode != 0:
                    raise _CompileFailed(f"{' '.join(cmd)}\n{proc.stderr.strip()[-2000:]}")
            return
        except _CompileFailed as failed:
            errors.append(str(failed))
    raise NativeUnavailable("compiling the ALS kernel failed:\n" + "\n".join(errors))


def load() -> ctypes.CDLL:
    """The compiled kernel library, built now if no cached build matches; raises :class:`NativeUnavailable`."""
    global _lib, _error
    if _lib is not None:
        return _lib
    if _error is not None:
        raise NativeUnavailable(_error)
    try:
        if os.name != "posix":
            raise NativeUnavailable(f"the ALS kernel needs a POSIX system (pthreads), not {os.name!r}")
        cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
        if cc is None:
            raise NativeUnavailable("no C compiler found (set $CC or install gcc/clang)")
        version = subprocess.run([cc, "--version"], capture_output=True, text=True).stdout
        key = hashlib.sha256("\0".join([SOURCE.read_text(), cc, version, _cpu_id(), repr(_FLAGS)]).encode())
        out = cache_root() / "kernels" / f"als_sweep-{key.hexdigest()[:16]}.so"
        if not out.exists():
            out.parent.mkdir(parents=True, exist_ok=True)
            _compile(cc, out)
        lib = ctypes.CDLL(str(out))
        for name, ct in (("als_sweep_f32", ctypes.c_float), ("als_sweep_f64", ctypes.c_double)):
            fn = getattr(lib, name)
            fn.restype = ctypes.c_int
            fn.argtypes = [ctypes.c_void_p] * 5 + [ctypes.c_int64] * 3 + [ct, ctypes.c_int64, ctypes.c_void_p]
    except (NativeUnavailable, OSError, subprocess.SubprocessError) as exc:
        detail = " ".join(str(exc).split())
        _error = (f"the native ALS kernel cannot be built here: install gcc or clang (or set $CC to a working C "
                  f"compiler), or set compress.als_backend to auto or torch ({detail[:300]})")
        raise NativeUnavailable(_error) from exc
    _lib = lib
    return lib


def available() -> bool:
    """True when the kernel is built (or can be built now) and loads."""
    try:
        load()
    except NativeUnavailable:
        return False
    return True


def usable(*tensors: torch.Tensor) -> bool:
    """The kernel handles these tensors: CPU, float32 or float64."""
    return all(t.device.type == "cpu" and t.dtype in (torch.float32, torch.float64) for t in tensors)


def warn_fallback() -> None:
    warnings.warn(f"AIR's fused ALS kernel is unavailable, using the slower torch path: {_error}", stacklevel=3)


def sweep(resid: torch.Tensor, c: torch.Tensor, us: torch.Tensor, vs: torch.Tensor, den: torch.Tensor,
          track: bool = False) -> list[float] | None:
    """One backward sweep in place on ``resid`` (m x n), ``us`` (k x m), ``vs`` (k x n); see ``csrc/als_sweep.c``.

    ``den`` (k x n) holds Eq. 5's denominators ``sum_i C_ij u_r[i]^2`` for the entering ``us``, clamped to the
    dtype's tiny. With ``track`` returns the objective (Eq. 4) after every rank step, in visiting order.
    """
    lib = load()
    dtype = resid.dtype
    for name, t in (("resid", resid), ("c", c), ("us", us), ("vs", vs), ("den", den)):
        if t.dtype != dtype or t.device.type != "cpu" or not t.is_contiguous():
            raise ValueError(f"{name}: the ALS kernel needs contiguous CPU {dtype} tensors, got {t.dtype} "
                             f"on {t.device} (contiguous: {t.is_contiguous()})")
    (m, n), k = resid.shape, us.shape[0]
    if c.shape != (m, n) or us.shape != (k, m) or vs.shape != (k, n) or den.shape != (k, n):
        raise ValueError(f"shape mismatch: resid {tuple(resid.shape)}, c {tuple(c.shape)}, us {tuple(us.shape)}, "
                         f"vs {tuple(vs.shape)}, den {tuple(den.shape)}")
    # every thread forms all of b from the per-thread column sums, so keep blocks of at least 32 rows
    nthreads = max(1, min(torch.get_num_threads(), m // 32, 64))
    obj = torch.zeros(nthreads, k, dtype=torch.float64) if track else None
    fn = lib.als_sweep_f32 if dtype == torch.float32 else lib.als_sweep_f64
    rc = fn(resid.data_ptr(), c.data_ptr(), us.data_ptr(), vs.data_ptr(), den.data_ptr(), m, n, k,
            torch.finfo(dtype).tiny, nthreads, obj.data_ptr() if obj is not None else None)
    if rc != 0:
        raise MemoryError(f"the ALS kernel could not allocate its buffers or start {nthreads} threads "
                          f"(code {rc}); lower torch.set_num_threads or use als_backend='torch'")
    if obj is None:
        return None
    return obj.sum(0).flip(0).tolist()
