"""The Triton ALS kernels (air_ft.gpu_als) against the torch reference sweep.

They run here in Triton's interpreter (``TRITON_INTERPRET=1``, CPU tensors, in a subprocess since the flag is read
when the kernels are defined): the same kernel code that runs on a GPU, checked for the same numbers. Speed is
measured on a GPU by benchmarks/scale.py, never here.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
triton = pytest.importorskip("triton", reason="the Triton kernels need the triton package (pip install triton)")

SCRIPT = r"""
import torch
from air_ft import gpu_als
from air_ft.linalg import als_sweep, weighted_objective

g = torch.Generator().manual_seed(3)
for m, n, k, sweeps in [(21, 13, 4, 2), (9, 30, 1, 1), (34, 17, 6, 1)]:
    w = torch.randn(m, n, generator=g, dtype=torch.float64)
    c = 1.0 + 4 * torch.rand(m, n, generator=g, dtype=torch.float64)
    u, s, vh = torch.linalg.svd(w, full_matrices=False)
    ref = als_sweep(w, c, u[:, :k], s[:k], vh[:k], sweeps=sweeps, backend="torch")
    got = als_sweep(w, c, u[:, :k], s[:k], vh[:k], sweeps=sweeps, backend="triton")
    assert torch.allclose(got.sigma, ref.sigma, rtol=1e-4, atol=1e-5), (got.sigma, ref.sigma)
    approx_ref = ref.u @ torch.diag(ref.sigma) @ ref.vh
    approx = got.u @ torch.diag(got.sigma) @ got.vh
    assert torch.allclose(approx, approx_ref, rtol=1e-4, atol=1e-5)
    # the guarantee: the weighted objective never increases, sweep after sweep
    assert all(b <= a * (1 + 1e-6) for a, b in zip(got.objective, got.objective[1:])), got.objective
    assert abs(weighted_objective(c, w, approx.double()) - got.objective[-1]) < 1e-3 * got.objective[-1]
from air_ft.linalg import triton_available
assert triton_available("cpu")
print("ok")
"""


def test_triton_kernels_reproduce_the_reference_sweep():
    path = f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": path}
    proc = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stderr[-3000:]


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1", reason="the interpreter accepts CPU tensors")
def test_the_triton_backend_refuses_cpu_tensors_with_what_to_use():
    from air_ft.linalg import als_sweep

    w = torch.randn(8, 6, dtype=torch.float64)
    u, s, vh = torch.linalg.svd(w, full_matrices=False)
    with pytest.raises(ValueError, match="CUDA float32.*'torch' or 'auto'"):
        als_sweep(w, torch.ones_like(w), u[:, :2], s[:2], vh[:2], backend="triton")
