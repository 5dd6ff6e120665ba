"""LoRA recovery of compressed SmolLM2-135M: dense, SVD-LLM(W), AIR, and each + LoRA (both placements).

    PYTHONPATH=. python benchmarks/recovery.py                         # full run; writes JSON after every model
    PYTHONPATH=. python benchmarks/recovery.py --retentions 0.6 --placements factors --max-steps 32

Defaults are the training recipe chosen on the validation split (``--eval-split validation``): 64 steps of 2 x 512
tokens (65,536 tokens, about 15 minutes per LoRA run on 2 CPU cores), LoRA rank 8 (alpha 16) at lr 2e-3 with a
cosine schedule, loss = KL to the dense model's next-token distribution (``--distill 1.0``).

Protocol: compression with 64 x 512-token calibration windows (seed 0, from britannica
0-70 % and plays 0-45 %; AIR with its default settings). LoRA training text is that same calibration split (a
subset of "the first 80 % of britannica-11th.txt and the first half of shakespeare-plays.txt", so it never overlaps
evaluation text), packed into blocks of --seq-len tokens, equal share per source; every LoRA run sees the very same
blocks in the same order (same seed), i.e. the same number of training tokens. Evaluation on
britannica 80-100 % and plays 50-100 %, non-overlapping 512-token windows, at most 32 evenly spaced windows per
text. The file is re-read on start, so an interrupted run resumes where it stopped.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import time

import torch
from common import MODEL, RESULTS, environment, load_split, save_figure, subplots, write_json

import air_ft
from air_ft.compress import get_stats
from air_ft.config import CompressConfig
from air_ft.modeling import find_targets

OUTPUT = "recovery_smollm2.json"


def _air_settings() -> dict:
    """The AIR knobs in force (library defaults), recorded with every AIR evaluation."""
    cfg = CompressConfig()
    return {k: getattr(cfg, k) for k in ("influence", "normalization", "whitening", "delta", "sweeps")}
LABELS = {"svdllm": "SVD-LLM(W)", "air": "AIR"}


def evaluate(model, tok, texts: dict[str, str], seq_len: int, windows: int) -> dict:
    return {name: air_ft.evaluate_perplexity(model, tok, text, seq_len=seq_len, max_windows=windows, batch_size=4)
            for name, text in texts.items()}


def gap_closed(dense: float, before: float, after: float) -> float:
    """Fraction of the perplexity gap to the dense model that LoRA recovered: (before - after) / (before - dense)."""
    return (before - after) / (before - dense)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=MODEL)
    ap.add_argument("--retentions", type=float, nargs="+", default=[0.6, 0.4])
    ap.add_argument("--methods", nargs="+", default=["svdllm", "air"])
    ap.add_argument("--placements", nargs="+", default=["factors", "layer"])
    ap.add_argument("--max-steps", type=int, default=64)
    ap.add_argument("--seq-len", type=int, default=512, help="training block length")
    ap.add_argument("--batch-size", type=int, default=2)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--lora-rank", type=int, default=8)
    ap.add_argument("--distill", type=float, default=1.0,
                    help="weight of the KL to the dense model's next-token distribution in the training loss")
    ap.add_argument("--lora-init", choices=["zero", "residual"], default="zero",
                    help="residual: layer-placement adapters start at the whitened top-r SVD of W - UV")
    ap.add_argument("--distill-temperature", type=float, default=1.0, help="KD temperature T (loss scaled by T^2)")
    ap.add_argument("--britannica-share", type=float, default=0.5,
                    help="share of the training blocks drawn from britannica (the rest from plays)")
    ap.add_argument("--eval-seq-len", type=int, default=512)
    ap.add_argument("--eval-windows", type=int, default=32)
    ap.add_argument("--eval-split", choices=["evaluation", "validation"], default="evaluation",
                    help="validation: britannica 70-80 %% and plays 45-50 %%, for choosing training settings")
    ap.add_argument("--output", default=OUTPUT)
    ap.add_argument("--fresh", action="store_true", help="ignore an existing results file")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    ap.add_argument("--combine", nargs="+", default=None, metavar="FILE",
                    help="no training: merge these results files (same training settings, e.g. one per method run "
                         "in parallel) into --output and print the table")
    ap.add_argument("--baseline-from", default=None,
                    help="results file whose dense and compressed (no LoRA) evaluations to reuse (same protocol)")
    args = ap.parse_args()
    if not 0.0 < args.britannica_share < 1.0:
        ap.error(f"--britannica-share must lie strictly between 0 and 1 (plays gets the rest), got "
                 f"{args.britannica_share}")
    if args.combine:
        combine(args.combine, args.output)
        return
    torch.manual_seed(0)
    if args.threads:
        torch.set_num_threads(args.threads)

    path = RESULTS / args.output
    report = json.loads(path.read_text()) if path.exists() and not args.fresh else {}
    settings = {k: getattr(args, k) for k in ("max_steps", "seq_len", "batch_size", "lr", "lora_rank", "distill")}
    # recorded only when changed, so that earlier files stay comparable
    for key, default in (("distill_temperature", 1.0), ("lora_init", "zero"), ("britannica_share", 0.5)):
        if getattr(args, key) != default:
            settings[key] = getattr(args, key)
    if report.get("train_settings") not in (None, settings):
        raise SystemExit(f"{path} was written with other training settings {report['train_settings']}; "
                         "pass --fresh or --output")
    report.update({"protocol": __doc__, "args": vars(args), "environment": environment(), "train_settings": settings,
                   "train_tokens": args.max_steps * args.batch_size * args.seq_len})
    report.setdefault("results", {})
    if args.baseline_from:  # deterministic evaluations of the same models: copy rather than recompute
        base = json.loads((RESULTS / args.baseline_from).read_text())
        report.setdefault("dense", base["dense"])
        air_now = _air_settings()
        for rho, row in base["results"].items():
            for method, entry in row.items():
                # an AIR evaluation is reusable only if it was made with today's AIR defaults
                if "eval" in entry and (method != "air" or entry.get("air_settings") == air_now):
                    mine = report["results"].setdefault(rho, {}).setdefault(method, {})
                    for key in ("eval", "retention_actual", "model_params"):
                        mine.setdefault(key, entry[key])
        report["baseline_from"] = args.baseline_from

    t0 = time.perf_counter()
    dense, tok = air_ft.load_model(args.model)
    cal = load_split("calibration")
    evl = (load_split("evaluation") if args.eval_split == "evaluation"
           else dict(zip(("britannica", "plays"), load_split("validation"))))
    stats = get_stats(dense, tok, cal, find_targets(dense), CompressConfig(num_samples=64, seq_len=512),
                      influence=True)
    print(f"model + calibration statistics in {time.perf_counter() - t0:.0f}s (cached: {stats.cached})")
    if "dense" not in report:
        report["dense"] = evaluate(dense, tok, evl, args.eval_seq_len, args.eval_windows)
        write_json(args.output, report)
    # cheapest-first order: every retention's factors placement before any layer placement
    compressed = {}
    for placement in args.placements:
        for rho in args.retentions:
            row = report["results"].setdefault(str(rho), {})
            for method in args.methods:
                entry = row.setdefault(method, {})
                key = f"lora_{placement}"
                if key in entry:
                    _line(rho, f"{LABELS[method]}+LoRA[{placement}]", entry[key]["eval"], report["dense"])
                    continue
                if (rho, method) not in compressed:
                    model = copy.deepcopy(dense)
                    info = air_ft.compress(model, tok, None, method=method, retention=rho, stats=stats,
                                           progress=False)
                    compressed[rho, method] = model
                    if "eval" not in entry:
                        entry.update(eval=evaluate(model, tok, evl, args.eval_seq_len, args.eval_windows),
                                     retention_actual=info.retention_actual,
                                     model_params=info.model_params_after)
                        if method == "air":
                            entry["air_settings"] = _air_settings()
                        write_json(args.output, report)
                    _line(rho, LABELS[method], entry["eval"], report["dense"])
                t1 = time.perf_counter()
                tuned, summary = air_ft.finetune(copy.deepcopy(compressed[rho, method]), tok, cal,
                                        return_summary=True, max_steps=args.max_steps,
                                        lora_rank=args.lora_rank, learning_rate=args.lr, seq_len=args.seq_len,
                                        batch_size=args.batch_size, seed=0, placement=placement,
                                        logging_steps=2, progress=False, distill=args.distill,
                                        distill_temperature=args.distill_temperature,
                                        lora_init=args.lora_init if placement == "layer" else "zero", stats=stats,
                                        text_weights=[args.britannica_share, 1.0 - args.britannica_share],
                                        teacher=dense)  # distillation teacher and residual source
                seconds = time.perf_counter() - t1
                log = dataclasses.asdict(summary)
                entry[key] = {"eval": evaluate(tuned, tok, evl, args.eval_seq_len, args.eval_windows),
                              "train_seconds": seconds, "train_loss": log["train_loss"], "tokens": log["tokens"],
                              "budget": log["budget"], "init": log["init"],
                              "losses": [(e["step"], e["loss"]) for e in log["log"] if "loss" in e],
                              "ranks_after_merge": sorted({m.rank for m in tuned.modules()
                                                           if isinstance(m, air_ft.LowRankLinear)})}
                for name in evl:
                    entry[key][f"gap_closed_{name}"] = gap_closed(report["dense"][name]["ppl"],
                                                                  entry["eval"][name]["ppl"],
                                                                  entry[key]["eval"][name]["ppl"])
                write_json(args.output, report)
                _line(rho, f"{LABELS[method]}+LoRA[{placement}]", entry[key]["eval"], report["dense"],
                      f"  train {seconds:.0f}s")
                del tuned
    _table(report)
    print(f"wrote {plot(report, path.with_suffix('.png'))}")


def combine(files: list[str], output: str) -> None:
    """Merge results files written with the same training settings and evaluation into one."""
    parts = [json.loads((RESULTS / f).read_text()) for f in files]
    first = parts[0]
    for f, part in zip(files, parts):
        for key in ("train_settings", "dense"):
            if part[key] != first[key]:
                raise SystemExit(f"{f} differs from {files[0]} in {key}; only runs of one protocol can be combined")
    report = {k: v for k, v in first.items() if k != "results"}
    report["combined_from"] = files
    report["results"] = {}
    for part in parts:
        for rho, row in part["results"].items():
            for method, entry in row.items():
                report["results"].setdefault(rho, {}).setdefault(method, {}).update(entry)
    path = write_json(output, report)
    _table(report)
    print(f"wrote {path} and {plot(report, path.with_suffix('.png'))}")


def plot(report: dict, path):
    """Grouped bars: perplexity of each model before and after LoRA, one panel per retention and text."""
    names, rhos = list(report["dense"]), sorted(report["results"], key=float, reverse=True)
    fig, axes = subplots(len(rhos), len(names), 5.5, 3.6)
    for i, rho in enumerate(rhos):
        for j, name in enumerate(names):
            ax, labels, vals = axes[i][j], [], []
            for method, entry in report["results"][rho].items():
                if "eval" in entry:
                    labels.append(LABELS[method])
                    vals.append(entry["eval"][name]["ppl"])
                for key, sub in entry.items():
                    if key.startswith("lora_"):
                        labels.append(f"{LABELS[method]}\n+LoRA[{key[5:]}]")
                        vals.append(sub["eval"][name]["ppl"])
            ax.bar(range(len(vals)), vals, color=["#999" if "LoRA" not in lab else
                                                  ("#1f77b4" if lab.startswith("AIR") else "#ff7f0e")
                                                  for lab in labels])
            ax.set_xticks(range(len(vals)), labels, fontsize=7)
            ax.axhline(report["dense"][name]["ppl"], color="k", ls="--", lw=1, label="dense")
            ax.set_ylabel("perplexity")
            ax.set_title(f"retention {rho}, {name} (held out)")
            ax.legend(fontsize=8)
    return save_figure(fig, path)


def _line(rho, label, ev, dense, extra="") -> None:
    cells = "  ".join(f"{n} {ev[n]['ppl']:8.2f} (dense {dense[n]['ppl']:.2f})" for n in ev)
    print(f"rho={rho}  {label:<28} {cells}{extra}", flush=True)


def _table(report: dict) -> None:
    names = list(report["dense"])
    print(f"\n{'retention':<10}{'model':<28}" + "".join(f"{n:>14}" for n in names) + f"{'gap closed (brit.)':>20}")
    print(f"{'1.0':<10}{'dense':<28}" + "".join(f"{report['dense'][n]['ppl']:>14.2f}" for n in names))
    for rho, row in report["results"].items():
        for method, entry in row.items():
            if "eval" not in entry:
                continue
            print(f"{rho:<10}{LABELS[method]:<28}" + "".join(f"{entry['eval'][n]['ppl']:>14.2f}" for n in names))
            for key, sub in entry.items():
                if key.startswith("lora_"):
                    label = f"{LABELS[method]}+LoRA[{key[5:]}]"
                    closed = sub.get(f"gap_closed_{names[0]}", float("nan"))
                    print(f"{rho:<10}{label:<28}" + "".join(f"{sub['eval'][n]['ppl']:>14.2f}" for n in names)
                          + f"{closed:>20.2f}")


if __name__ == "__main__":
    main()
