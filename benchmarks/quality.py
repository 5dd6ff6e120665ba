"""Perplexity of dense SmolLM2-135M and of all five methods at several retentions, under one protocol.

    python benchmarks/quality.py                      # full run (~50 min on 2 CPU cores); writes JSON
    python benchmarks/quality.py --retentions 0.6     # one retention

Protocol: calibration windows (64 x 512 tokens, seed 0) from the first 70 % of britannica-11th.txt and the first
45 % of shakespeare-plays.txt; AIR's signal, normalization and delta are chosen on a validation split carved from
the calibration text (britannica 70-80 %, plays 45-50 %); evaluation on britannica 80-100 % and plays 50-100 %
(non-overlapping 512-token windows; the plays are sampled by evenly spaced windows, counts reported). Every
method shares the same calibration statistics. "Retention" counts the parameters of the compressed linear layers.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import itertools
import json
import math
import time

import torch
from common import MODEL, RESULTS, environment, load_split, save_figure, set_threads, subplots, write_json

import air_ft
from air_ft.compress import get_stats
from air_ft.config import CompressConfig
from air_ft.modeling import find_targets


def val_score(model, tok, val_texts, seq_len, windows) -> float:
    """Geometric mean of the validation perplexities (one per source)."""
    logs = [math.log(air_ft.perplexity(model, tok, t, seq_len=seq_len, max_windows=windows, batch_size=4))
            for t in val_texts]
    return math.exp(sum(logs) / len(logs))


def evaluate(model, tok, eval_texts, seq_len, windows) -> dict:
    out = {}
    for name, text in eval_texts.items():
        res = air_ft.evaluate_perplexity(model, tok, text, seq_len=seq_len, max_windows=windows, batch_size=4)
        out[name] = res
    return out


def run_method(dense, tok, stats, method, retention, **opts):
    model = copy.deepcopy(dense)
    info = air_ft.compress(model, tok, None, method=method, retention=retention, stats=stats, progress=False,
                           **opts)
    return model, info


def air_defaults(dense, tok, stats, rho, evl, val, args) -> dict:
    """AIR with the library's defaults: evaluation, validation, time, size."""
    model, info = run_method(dense, tok, stats, "air", rho)
    return {"eval": evaluate(model, tok, evl, args.seq_len, args.eval_windows),
            "validation": val_score(model, tok, val, args.seq_len, args.val_windows),
            "seconds": info.compression_seconds, "retention_actual": info.retention_actual,
            "model_params": info.model_params_after, "objective_reduction": _mean_reduction(info.objective)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=MODEL)
    ap.add_argument("--retentions", type=float, nargs="+", default=[0.8, 0.6, 0.4])
    ap.add_argument("--num-samples", type=int, default=64)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--eval-windows", type=int, default=32, help="cap per evaluation text (evenly spaced)")
    ap.add_argument("--val-windows", type=int, default=12)
    ap.add_argument("--deltas", type=float, nargs="+", default=[0.25, 0.5, 1.0, 2.0])
    ap.add_argument("--signals", nargs="+", default=["fisher", "wxg"])
    ap.add_argument("--normalizations", nargs="+", default=["mean", "power"])
    ap.add_argument("--whitenings", nargs="+", default=["cholesky", "symmetric"])
    ap.add_argument("--baselines", nargs="*", default=["svd", "asvd", "fwsvd", "svdllm"])
    ap.add_argument("--grid", nargs="*", default=None,
                    help="explicit AIR configurations 'signal/normalization/whitening/delta' for the first retention "
                         "(instead of the product of --signals --normalizations --whitenings --deltas)")
    ap.add_argument("--later-deltas", type=float, nargs="*", default=None,
                    help="deltas searched at later retentions (default: --deltas; empty: library defaults only)")
    ap.add_argument("--reuse-baselines", default=None, metavar="FILE",
                    help="copy the baseline rows (and dense) from an earlier results file of the same protocol "
                         "instead of recomputing them (they do not depend on AIR's settings)")
    ap.add_argument("--no-eval", action="store_true", help="validation only (for exploring the AIR grid)")
    ap.add_argument("--plot-only", action="store_true", help="redraw the plot and table from the JSON")
    ap.add_argument("--output", default="quality_smollm2.json")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    args = ap.parse_args()
    set_threads(args.threads)
    if args.plot_only:
        report = json.loads((RESULTS / args.output).read_text())
        _table(report)
        print(f"wrote {plot(report, RESULTS / args.output.replace('.json', '.png'))}")
        return
    torch.manual_seed(0)

    t0 = time.perf_counter()
    dense, tok = air_ft.load_model(args.model)
    cal, val, evl = load_split("calibration"), load_split("validation"), load_split("evaluation")
    defaults = CompressConfig()
    cfg = CompressConfig(num_samples=args.num_samples, seq_len=args.seq_len)
    # first pass with wxg/fisher (FWSVD and the non-whitened AIR signals need them), then the whitened pass
    stats = get_stats(dense, tok, cal, find_targets(dense), dataclasses.replace(cfg, influence="fisher"),
                      influence=True)
    wanted = {c.split("/")[0] for c in args.grid or []} | set(args.signals) | {defaults.influence}
    if "fisher_whitened" in wanted:  # a second calibration pass (cached like the first)
        white = get_stats(dense, tok, cal, find_targets(dense), dataclasses.replace(cfg, influence="fisher_whitened"),
                          influence=True)
        stats.influence["fisher_whitened"] = white.influence["fisher_whitened"]
        stats.seconds = white.seconds  # first + second pass
    report = {"protocol": __doc__, "args": vars(args), "environment": environment(),
              "calibration": {"seconds": stats.seconds, "cached": stats.cached, "tokens": stats.tokens},
              "defaults": {k: getattr(defaults, k) for k in ("influence", "normalization", "whitening", "delta",
                                                              "sweeps")},
              "dense": {} if args.no_eval else evaluate(dense, tok, evl, args.seq_len, args.eval_windows),
              "dense_validation": val_score(dense, tok, val, args.seq_len, args.val_windows),
              "results": {}}
    print(f"model loaded + calibration in {time.perf_counter() - t0:.0f}s (cached: {stats.cached})")
    reuse = {}
    if args.reuse_baselines:
        old = json.loads((RESULTS / args.reuse_baselines).read_text())
        same = ("num_samples", "seq_len", "eval_windows", "val_windows")
        if any(old["args"][k] != getattr(args, k) for k in same) or old["dense"] != report["dense"]:
            raise SystemExit(f"{args.reuse_baselines} was measured under another protocol ({same} or dense differ)")
        reuse = old["results"]
        report["baselines_from"] = args.reuse_baselines
    best_pair = None
    for rho in args.retentions:
        row = report["results"][str(rho)] = {}
        for method in args.baselines:
            if method in reuse.get(str(rho), {}):
                row[method] = reuse[str(rho)][method]
                _print(rho, f"{method} (reused)", row[method])
                continue
            model, info = run_method(dense, tok, stats, method, rho)
            row[method] = {"eval": {} if args.no_eval else evaluate(model, tok, evl, args.seq_len, args.eval_windows),
                           "validation": val_score(model, tok, val, args.seq_len, args.val_windows)
                           if method == "svdllm" else None,
                           "seconds": info.compression_seconds, "retention_actual": info.retention_actual,
                           "model_params": info.model_params_after, "rungs": _count(info.rungs)}
            _print(rho, method, row[method])
            del model
        # AIR: choose signal / normalization / whitening / delta on the validation split only; the first
        # retention searches every combination, later ones only delta for the best combination
        if best_pair is None and args.grid:
            configs = [(*c.split("/")[:3], float(c.split("/")[3])) for c in args.grid]
        elif best_pair is None:
            configs = [(*c, d) for c, d in itertools.product(itertools.product(
                args.signals, args.normalizations, args.whitenings), args.deltas)]
        else:
            later = args.deltas if args.later_deltas is None else args.later_deltas
            configs = [(*best_pair, d) for d in later]
        grid, best = {}, (float("inf"), None, None)
        for sig, norm, white, delta in configs:
            model, info = run_method(dense, tok, stats, "air", rho, influence=sig, normalization=norm,
                                     whitening=white, delta=delta)
            score = val_score(model, tok, val, args.seq_len, args.val_windows)
            key = f"{sig}/{norm}/{white}/{delta}"
            grid[key] = {"validation": score, "seconds": info.compression_seconds}
            print(f"  rho={rho} air {key}: validation ppl {score:.2f} ({info.compression_seconds:.0f}s)",
                  flush=True)
            if score < best[0]:
                best = (score, key, (model, info))
            del model
            report["results"][str(rho)]["air_grid"] = grid
            write_json(args.output, report)
        default_key = f"{defaults.influence}/{defaults.normalization}/{defaults.whitening}/{defaults.delta}"
        if not grid:  # no search at this retention: the library defaults alone
            row["air"] = air_defaults(dense, tok, stats, rho, evl, val, args)
            _print(rho, "air (defaults)", row["air"])
            write_json(args.output, report)
            continue
        score, chosen, (model, info) = best
        sig, norm, white, delta = chosen.split("/")
        if best_pair is None:
            best_pair = (sig, norm, white)
        if args.no_eval:
            continue
        row["air_selected"] = {"choice": chosen, "eval": evaluate(model, tok, evl, args.seq_len, args.eval_windows),
                               "validation": score, "seconds": info.compression_seconds,
                               "retention_actual": info.retention_actual, "rungs": _count(info.rungs),
                               "model_params": info.model_params_after,
                               "objective_reduction": _mean_reduction(info.objective)}
        _print(rho, f"air [{chosen}]", row["air_selected"])
        del model, best
        if default_key == chosen:  # the library defaults are this very configuration: same numbers
            row["air"] = {**row["air_selected"], "same_as": "air_selected"}
        else:
            row["air"] = air_defaults(dense, tok, stats, rho, evl, val, args)
        _print(rho, "air (defaults)", row["air"])
        write_json(args.output, report)
    _table(report)
    path = write_json(args.output, report)
    if not args.no_eval:
        print(f"wrote {path} and {plot(report, path.with_suffix('.png'))}")


def plot(report: dict, path):
    """Perplexity against retention, one panel per evaluation text, log scale (plain SVD explodes)."""
    names = list(report["dense"])
    fig, axes = subplots(1, len(names), 5, 4)
    rhos = sorted(report["results"], key=float)
    for ax, name in zip(axes[0], names):
        for method in ("svd", "asvd", "fwsvd", "svdllm", "air"):
            pts = [(float(r), report["results"][r][method]["eval"][name]["ppl"]) for r in rhos
                   if method in report["results"][r]]
            if pts:
                ax.plot(*zip(*pts), marker="o", label={"air": "AIR (defaults)", "svdllm": "SVD-LLM(W)"}.get(
                    method, method.upper()))
        ax.axhline(report["dense"][name]["ppl"], color="k", ls="--", lw=1, label="dense")
        ax.set_yscale("log")
        ax.set_xlabel("retention of decoder linear parameters")
        ax.set_ylabel("perplexity (log scale)")
        ax.set_title(f"SmolLM2-135M, {name} (held out)")
        ax.legend(fontsize=8)
    return save_figure(fig, path)


def _count(rungs: dict) -> dict:
    out: dict = {}
    for r in rungs.values():
        out[r] = out.get(r, 0) + 1
    return out


def _mean_reduction(obj: dict) -> float:
    vals = [(a - b) / a for a, b in obj.values() if a > 0]
    return sum(vals) / len(vals) if vals else 0.0


def _print(rho, name, rec) -> None:
    ev = " ".join(f"{k} {v['ppl']:.2f}" for k, v in rec["eval"].items())
    val = f"val {rec['validation']:.2f}, " if rec.get("validation") is not None else ""
    print(f"rho={rho} {name:>24}: {ev}  ({val}{rec['seconds']:.1f}s)", flush=True)


def _table(report: dict) -> None:
    names = list(report["dense"])
    print("\nperplexity (" + ", ".join(f"{n}: {report['dense'][n]['tokens']} tokens" for n in names) + ")")
    print(f"{'retention':>9} {'method':>14} " + " ".join(f"{n:>12}" for n in names) + "  vs svdllm   seconds")
    print(f"{'1.0':>9} {'dense':>14} " + " ".join(f"{report['dense'][n]['ppl']:12.2f}" for n in names))
    for rho, row in report["results"].items():
        base = row["svdllm"]["eval"]
        for method, rec in row.items():
            if method == "air_grid":
                continue
            gain = " ".join(f"{100 * (rec['eval'][n]['ppl'] / base[n]['ppl'] - 1):+6.1f}%" for n in names)
            print(f"{rho:>9} {method:>14} " + " ".join(f"{rec['eval'][n]['ppl']:12.2f}" for n in names)
                  + f"  {gain}  {rec['seconds']:6.1f}")


if __name__ == "__main__":
    main()
