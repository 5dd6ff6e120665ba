"""Monotone descent of AIR's ALS on every SmolLM2 matrix, and compression time of AIR vs SVD-LLM(W).

    python benchmarks/als_audit.py                    # audit at 0.6 + timing at 0.8/0.6/0.4 (~15 min, 2 cores)
    python benchmarks/als_audit.py --calibration      # also time a fresh (uncached) calibration

For each of the 210 decoder matrices, the whitened weight, its influence map (library defaults) and the SVD start
are formed exactly as ``air_ft.compress`` does, and the ALS sweep records Eq. 4 after every rank step. A violation
is a step whose objective exceeds the previous one by more than ``tol`` relative (float64 accumulation of the
objective; the sweep itself in float32 as shipped, and in float64).
Timing: whole-model compression (whitening + SVD (+ ALS) + module swap) with shared cached calibration
statistics, SVD-LLM(W) and AIR alternating, best of ``--repeats``.
"""

from __future__ import annotations

import argparse
import copy
import json
import time

import torch
from common import MODEL, RESULTS, environment, load_split, set_threads, write_json
from tqdm.auto import tqdm

import air_ft
from air_ft import linalg, native
from air_ft.compress import get_stats
from air_ft.config import CompressConfig
from air_ft.modeling import find_targets


def problems(dense, stats, cfg: CompressConfig, retention: float, only: str = ""):
    """Yield ``(name, (W S, C, U, sigma, Vh))`` per decoder matrix (names starting with ``only``), formed as
    ``air_ft.compress`` forms them: whitened weight, influence weights, SVD start at ``retention``'s rank."""
    whiten: dict = {}
    for name, mod in find_targets(dense).items():
        if not name.startswith(only):
            continue
        m, n = mod.weight.shape
        group = stats.group_of[name]
        if group not in whiten:  # q/k/v and gate/up share one input, hence one factor
            whiten = {group: linalg.whitening_factor(stats.grams[group], cfg.eps)[0]}
        wp = mod.weight.detach().double() @ whiten[group]
        u, sig, vh = linalg.truncated_svd(wp, linalg.rank_for_retention(m, n, retention))
        c = 1 + cfg.delta * linalg.normalize_influence(stats.influence[cfg.influence][name], cfg.normalization,
                                                       cfg.max_ratio)
        yield name, (wp, c, u, sig, vh)


def audit(dense, stats, cfg: CompressConfig, dtype: torch.dtype, tol: float, backend: str) -> dict:
    violations, worst, steps, reductions, matrices = 0, 0.0, 0, [], 0
    for _, (wp, c, u, sig, vh) in tqdm(problems(dense, stats, cfg, cfg.retention), desc=f"audit {dtype}",
                                       total=len(find_targets(dense))):
        matrices += 1
        res = linalg.als_sweep(wp, c, u, sig, vh, sweeps=cfg.sweeps, track_steps=True, dtype=dtype,
                               backend=backend)
        trace = torch.tensor(res.objective, dtype=torch.float64)
        rel = (trace[1:] - trace[:-1]) / trace[:-1]
        violations += int((rel > tol).sum())
        worst = max(worst, float(rel.max()))
        steps += len(rel)
        reductions.append(float((trace[0] - trace[-1]) / trace[0]))
    return {"backend": backend, "matrices": matrices, "rank_steps": steps, "violations": violations,
            "tolerance": tol,
            "largest_relative_step_increase": worst,
            "objective_reduction_mean": sum(reductions) / len(reductions),
            "objective_reduction_min": min(reductions), "objective_reduction_max": max(reductions)}


def backends(dense, stats, cfg: CompressConfig, retention: float, repeats: int) -> dict:
    """One ALS sweep on layer 0's matrices at ``retention``'s ranks: the fused C kernel against the torch path."""
    out = {}
    for name, (wp, c, u, sig, vh) in problems(dense, stats, cfg, retention, only="model.layers.0."):
        (m, n), k = wp.shape, len(sig)
        wp = wp.float()
        best = {}
        for backend in ("native", "torch"):
            for _ in range(repeats):
                t0 = time.perf_counter()
                linalg.als_sweep(wp, c, u, sig, vh, backend=backend)
                best[backend] = min(best.get(backend, float("inf")), time.perf_counter() - t0)
        out[name.split(".")[-1]] = {"shape": [m, n], "rank": k, "native_seconds": best["native"],
                                    "torch_seconds": best["torch"], "speedup": best["torch"] / best["native"]}
        print(f"  {name}: {m}x{n} rank {k}: kernel {best['native']:.3f}s, torch {best['torch']:.3f}s "
              f"({best['torch'] / best['native']:.1f}x)", flush=True)
    return out


def timing(dense, tok, stats, retention: float, repeats: int, backend: str) -> dict:
    best = {"svdllm": float("inf"), "air": float("inf")}
    for _ in range(repeats):
        for method in best:
            model = copy.deepcopy(dense)
            info = air_ft.compress(model, tok, None, method=method, retention=retention, stats=stats,
                                   progress=False, als_backend=backend)
            best[method] = min(best[method], info.compression_seconds)
            del model
    return {**{f"{k}_seconds": v for k, v in best.items()}, "ratio_air_over_svdllm": best["air"] / best["svdllm"],
            "als_backend": backend}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=MODEL)
    ap.add_argument("--retention", type=float, default=0.6)
    ap.add_argument("--timing-retentions", type=float, nargs="*", default=[0.8, 0.6, 0.4])
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--calibration", action="store_true", help="also time an uncached calibration")
    ap.add_argument("--audit-dtypes", nargs="*", default=["float32", "float64"], help="ALS precisions to audit")
    ap.add_argument("--als-backend", choices=["native", "torch"],
                    default="native" if native.available() else "torch",
                    help="ALS implementation (default: the fused C kernel when it builds here, as the library does)")
    ap.add_argument("--backends", action="store_true",
                    help="time one sweep per layer-0 matrix (at the first timing retention) with both ALS backends")
    ap.add_argument("--output", default="als_audit_smollm2.json")
    ap.add_argument("--merge", action="store_true", help="add to an existing JSON instead of replacing it")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    args = ap.parse_args()
    set_threads(args.threads)
    dense, tok = air_ft.load_model(args.model)
    cal = load_split("calibration")
    cfg = CompressConfig(retention=args.retention)
    report: dict = {"protocol": __doc__, "environment": environment(),
                    "config": {k: getattr(cfg, k) for k in ("influence", "normalization", "whitening", "delta",
                                                            "sweeps")}}
    if args.merge and (RESULTS / args.output).exists():
        report = {**json.loads((RESULTS / args.output).read_text()), **report}
    report.setdefault("runs", []).append(vars(args))
    if args.calibration:
        fresh = get_stats(dense, tok, cal, find_targets(dense), CompressConfig(cache=False), influence=True)
        report["calibration_seconds"] = fresh.seconds
        print(f"calibration (64 x 512 tokens, every pass the library defaults need): {fresh.seconds:.0f}s")
    stats = get_stats(dense, tok, cal, find_targets(dense), cfg, influence=True)
    tolerances = {"float32": 1e-6, "float64": 1e-12}
    if args.audit_dtypes:
        report["audit"] = {d: audit(dense, stats, cfg, getattr(torch, d), tolerances[d],
                                    args.als_backend) for d in args.audit_dtypes}
    for key, rec in report.get("audit", {}).items():
        print(f"ALS {key} ({rec.get('backend', 'torch')}): {rec['violations']} violations in {rec['rank_steps']} "
              f"rank steps over {rec['matrices']} "
              f"matrices (tol {rec['tolerance']:g} relative; largest step change "
              f"{rec['largest_relative_step_increase']:+.2e}); objective reduced by "
              f"{100 * rec['objective_reduction_mean']:.2f} % on average")
    write_json(args.output, report)
    if args.backends and native.available():
        rho = (args.timing_retentions or [0.8])[0]
        report["backends"] = {"retention": rho, "threads": torch.get_num_threads(),
                              "matrices": backends(dense, stats, cfg, rho, args.repeats)}
        write_json(args.output, report)
    report.setdefault("timing", {})
    for rho in args.timing_retentions:
        t = report["timing"][str(rho)] = timing(dense, tok, stats, rho, args.repeats, args.als_backend)
        print(f"retention {rho}: SVD-LLM(W) {t['svdllm_seconds']:.1f}s, AIR {t['air_seconds']:.1f}s "
              f"(ratio {t['ratio_air_over_svdllm']:.2f})", flush=True)
        write_json(args.output, report)
    print(f"wrote {write_json(args.output, report)}")


if __name__ == "__main__":
    start = time.perf_counter()
    main()
    print(f"total {time.perf_counter() - start:.0f}s")
