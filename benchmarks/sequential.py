"""``compress.sequential`` on and off: SVD-LLM(W) and AIR on SmolLM2-135M at several retentions.

    python benchmarks/sequential.py --threads 1                 # 0.6 and 0.4, both methods (~1 h on one core)
    python benchmarks/sequential.py --retentions 0.6 --methods air

With ``sequential: false`` every block's Grams come from the dense model's activations; with ``true`` from the
activations that the already compressed blocks before it produce (GPTQ / SVD-LLM V2 style). Influence maps come
from the dense model either way. The default is chosen on the validation split (britannica 70-80 %, plays 45-50 %,
the geometric mean of the two perplexities); the held-out evaluation text (britannica 80-100 %, plays 50-100 %) is
reported beside it and played no part in the choice. Calibration: 64 x 512 tokens (seed 0) of the calibration
split, the recipes' AIR settings. Writes benchmarks/results/sequential_smollm2.json (+ .png).
"""

from __future__ import annotations

import argparse
import copy
import math
import time

from common import (
    MODEL,
    RESULTS,
    environment,
    load_split,
    previous_results,
    save_figure,
    set_threads,
    subplots,
    write_json,
)

import air_ft


def perplexities(model, tok, texts: dict[str, str], seq_len: int, windows: int) -> dict[str, float]:
    return {name: air_ft.perplexity(model, tok, text, seq_len=seq_len, max_windows=windows, batch_size=4)
            for name, text in texts.items()}


def geo_mean(values) -> float:
    values = list(values)
    return math.exp(sum(math.log(v) for v in values) / len(values))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=MODEL)
    ap.add_argument("--methods", nargs="+", default=["svdllm", "air"], choices=["svdllm", "air", "asvd"])
    ap.add_argument("--retentions", type=float, nargs="+", default=[0.6, 0.4])
    ap.add_argument("--num-samples", type=int, default=64)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--val-windows", type=int, default=12, help="evenly spaced windows per validation text")
    ap.add_argument("--eval-windows", type=int, default=32, help="evenly spaced windows per evaluation text")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--output", default="sequential_smollm2.json")
    ap.add_argument("--fresh", action="store_true", help="ignore the rows a previous run of the same settings wrote")
    args = ap.parse_args()
    for r in args.retentions:
        if not 0 < r < 1:
            ap.error(f"--retentions must lie strictly between 0 and 1, got {r}")
    if args.num_samples < 1 or args.seq_len < 2 or args.val_windows < 1 or args.eval_windows < 1:
        ap.error("--num-samples, --val-windows and --eval-windows must be >= 1 and --seq-len >= 2")
    set_threads(args.threads)
    dense, tok = air_ft.load_model(args.model)
    cal, val_list, evl = load_split("calibration"), load_split("validation"), load_split("evaluation")
    val = {"britannica": val_list[0], "plays": val_list[1]}
    settings = {k: v for k, v in vars(args).items() if k not in ("threads", "fresh")}
    rows = previous_results(args.output, settings, "rows") if not args.fresh else []
    dense_row = {"method": "dense", "validation": perplexities(dense, tok, val, args.seq_len, args.val_windows),
                 "evaluation": perplexities(dense, tok, evl, args.seq_len, args.eval_windows)}
    print(f"dense: validation {dense_row['validation']}, evaluation {dense_row['evaluation']}", flush=True)
    for retention in args.retentions:
        for method in args.methods:
            for sequential in (False, True):
                if any(r["method"] == method and r["retention"] == retention and r["sequential"] is sequential
                       for r in rows):
                    print(f"{method} {retention} sequential={sequential}: reused from {args.output}", flush=True)
                    continue
                model = copy.deepcopy(dense)
                t0 = time.perf_counter()
                info = air_ft.compress(model, tok, cal, method=method, retention=retention,
                                       num_samples=args.num_samples, seq_len=args.seq_len, sequential=sequential,
                                       progress=False)
                seconds = time.perf_counter() - t0
                row = {"method": method, "retention": retention, "sequential": sequential,
                       "validation": perplexities(model, tok, val, args.seq_len, args.val_windows),
                       "evaluation": perplexities(model, tok, evl, args.seq_len, args.eval_windows),
                       "seconds": seconds, "calibration_cached": info["calibration_cached"],
                       "stream": info["stream"]}
                row["validation_score"] = geo_mean(row["validation"].values())
                rows.append(row)
                # written after every row (complete: false) so that a killed run keeps what it measured
                write_json(args.output, {"settings": settings, "environment": environment(), "dense": dense_row,
                                         "rows": rows, "complete": False})
                print(f"{method} {retention} sequential={sequential}: validation {row['validation_score']:.2f} "
                      f"{row['validation']}, evaluation {row['evaluation']} ({seconds:.0f} s)", flush=True)
                del model
    wins = []
    for retention in args.retentions:
        for method in args.methods:
            off, on = (next(r for r in rows if r["method"] == method and r["retention"] == retention
                            and r["sequential"] is s) for s in (False, True))
            wins.append({"method": method, "retention": retention, "validation_off": off["validation_score"],
                         "validation_on": on["validation_score"],
                         "winner": "sequential" if on["validation_score"] < off["validation_score"] else "dense"})
    on_votes = sum(w["winner"] == "sequential" for w in wins)
    choice = on_votes * 2 > len(wins)
    print("\n| method | retention | sequential | val britannica | val plays | eval britannica | eval plays |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        v, e = r["validation"], r["evaluation"]
        print(f"| {r['method']} | {r['retention']} | {r['sequential']} | {v['britannica']:.2f} | {v['plays']:.2f} | "
              f"{e['britannica']:.2f} | {e['plays']:.2f} |")
    print(f"\nvalidation prefers sequential in {on_votes} of {len(wins)} cells -> default sequential: {choice}")
    path = write_json(args.output, {"settings": settings, "environment": environment(), "dense": dense_row,
                                    "rows": rows, "comparison": wins, "default_sequential": choice, "complete": True})
    fig, axes = subplots(1, 2, 4.5, 3.4)
    for ax, split in zip(axes[0], ("britannica", "plays")):
        for method in args.methods:
            for sequential, style in ((False, "o-"), (True, "s--")):
                pts = [(r["retention"], r["evaluation"][split]) for r in rows
                       if r["method"] == method and r["sequential"] is sequential]
                ax.plot(*zip(*sorted(pts)), style, label=f"{method}, sequential {str(sequential).lower()}")
        ax.axhline(dense_row["evaluation"][split], color="grey", lw=0.8, label="dense")
        ax.set_yscale("log")
        ax.set_xlabel("retention")
        ax.set_ylabel(f"held-out perplexity, {split}")
    axes[0][0].legend(fontsize=7)
    save_figure(fig, RESULTS / args.output.replace(".json", ".png"))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
