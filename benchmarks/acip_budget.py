"""ACIP-style against AIR + LoRA as the training budget grows: does ACIP's deficit at small budgets close?

    python benchmarks/acip_budget.py --threads 1 --multipliers 1 4 --own-stop   # CPU: several hours
    python benchmarks/acip_budget.py --multipliers 1 4 16 --device cuda     # the whole curve on a GPU

On two cores, ``--methods air`` and ``--methods acip`` in two processes side by side build the two halves of every
point (their stage directories are disjoint), and the plain command then reads both back into one JSON and plot.

For every multiplier k this runs the study pipeline (``air_ft.pipeline.run_study`` on the study recipe's model, data
and settings) with methods AIR and ACIP-style at one retention, both LoRA-recovered with equal total training tokens
(``study.equal_tokens``): ``train.max_steps`` is ``--base-steps`` x k (64 x 2 x 512 = 65k tokens at k = 1, the
study's CPU budget), and ACIP's reduced schedule is stretched as a whole by k: the masks' learning rate is divided by k
and lambda grows by ``lambda_growth ** (1 / k)`` a step, so that the mask phase takes about k times the steps (it
runs until its stop ratio, as the reference's does); the post-tune takes ``--post-tune-steps`` x k steps and ACIP's
LoRA fine-tune the rest. ``--own-stop`` adds ACIP-style rows whose mask phase stopped at the retention itself
(``x<k>-own-stop/``), beside the rows read at it from the map run to ``--stop-retention``. AIR's calibration
tokens (64 x 512) are reported beside. Perplexity on the held-out texts
(the six reasoning tasks with ``--tasks``, which costs about 13 min per model on one core). The schedule is the
recipe's ``acip`` section (study.yaml's was chosen on the validation split, benchmarks/acip_schedule.py; the
evaluation text played no part in it), with ``--schedule`` pairs on top.

Stage directories go under benchmarks/results/acip_budget_smollm2/x<k>/, so a rerun (or a larger --multipliers)
reuses every finished model; writes benchmarks/results/acip_budget_smollm2.json and .png after every multiplier.
Each row's ``stage_seconds`` are read from its stage markers (the time each stage took when it was built);
``wall_seconds`` is this run's time for the point, near zero when every stage was reused.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from common import RESULTS, ROOT, environment, save_figure, set_threads, subplots, write_json

from air_ft.config import RecipeError, load_recipe
from air_ft.pipeline import run_study

KEYS = {"mask_lr", "lora_lr", "lambda_init", "lambda_growth", "lora_rank", "lora_alpha", "scale"}


def recipe_schedule(recipe: str, text: str) -> dict:
    """The schedule at k = 1: the recipe's ``acip`` section (study.yaml's: the best reduced schedule on validation,
    benchmarks/README.md), with the ``key=value`` pairs of ``text`` on top."""
    acip = load_recipe(recipe).acip
    return {**{key: getattr(acip, key) for key in KEYS}, **parse_schedule(text)}


def parse_schedule(text: str) -> dict:
    out = {}
    for item in text.split():
        key, sep, val = item.partition("=")
        if not sep or key not in KEYS:
            raise ValueError(f"schedule item {item!r}: use key=value with key one of {sorted(KEYS)}")
        out[key] = int(val) if key == "lora_rank" else float(val)
    return out


def overrides(args, k: int, schedule: dict, own_stop: bool = False) -> list[str]:
    """The study recipe's overrides for multiplier ``k``. The schedule scales as a whole: the masks' learning rate
    falls and lambda grows ``k`` times slower, so that the mask phase takes about ``k`` times the steps (it runs
    until its stop ratio, as the reference's does; what it spends comes off ACIP's LoRA steps). ``own_stop``: ACIP
    alone, its mask phase stopped at ``--retention`` itself instead of read there from a map run to
    ``--stop-retention``."""
    steps = args.base_steps * k
    acip = {**schedule, "mask_lr": schedule["mask_lr"] / k, "lambda_growth": schedule["lambda_growth"] ** (1.0 / k),
            "lambda_every": 1, "max_steps": "null", "post_tune_steps": args.post_tune_steps * k,
            "stop_retention": args.retention if own_stop else args.stop_retention, "seq_len": args.seq_len,
            "batch_size": args.batch_size}
    methods = ["acip"] if own_stop else args.methods
    folder = RESULTS / "acip_budget_smollm2" / (f"x{k}-own-stop" if own_stop else f"x{k}")
    out = [f"output_dir={folder}", f"study.methods=[{','.join(methods)}]",
           f"study.retentions=[{args.retention}]", "study.dense=false", "study.lora=true", "study.equal_tokens=true",
           f"train.max_steps={steps}", f"train.seq_len={args.seq_len}", f"train.batch_size={args.batch_size}",
           "train.grad_accum=1", "eval.efficiency=false", f"model.device={args.device}"]
    out += [f"acip.{key}={val}" for key, val in acip.items()]
    out.append("eval.tasks=[" + ",".join(args.tasks) + "]")
    return out


def stage_seconds(stages, name: str) -> dict:
    """Seconds each stage of row ``name`` took when it was built (a rerun that reuses a stage costs ~0)."""
    base = name.removesuffix("+lora")
    parts = [("compress", base)] + ([("train", base)] if name != base else []) + [("evaluate", name)]
    out = {}
    for label, sub in parts:
        marker = stages / ("eval" if label == "evaluate" else label) / sub / "stage.json"
        out[label] = json.loads(marker.read_text())["seconds"] if marker.exists() else None
    return out


def summarize(report: dict, k: int, stages=None, suffix: str = "") -> dict:
    rows = {}
    for r in report["rows"]:
        label = {"air": "AIR", "acip": "ACIP-style"}[r["method"]] + suffix + (" + LoRA" if r["lora"] else "")
        rows[label] = {"training_tokens": r["tokens"]["training"], "calibration_tokens": r["tokens"]["calibration"],
                       "retention_actual": r["compress"]["retention_actual"],
                       "perplexity": {n: v["ppl"] for n, v in r.get("perplexity", {}).items()},
                       "tasks": {t: {m: v.get(m) for m in ("acc", "acc_stderr", "acc_norm", "acc_norm_stderr")}
                                 for t, v in r.get("tasks", {}).items()}}
        if stages is not None:
            rows[label]["stage_seconds"] = stage_seconds(stages, r["name"])
    acip = next((r["compress"] for r in report["rows"] if r["method"] == "acip" and not r["lora"]), {})
    return {"multiplier": k, "budget_tokens": report["setup"]["lora_train_tokens"], "rows": rows,
            "acip_mask_steps": acip.get("mask_steps"), "acip_retention_reached": acip.get("retention_reached"),
            "acip_lora_share": acip.get("lora_share")}


def plot(points: list[dict], path) -> None:
    texts = sorted({n for p in points for row in p["rows"].values() for n in row["perplexity"]})
    fig, axes = subplots(1, len(texts), 5.0, 3.6)
    for ax, text in zip(axes[0], texts):
        for label, style in (("AIR", "C0--x"), ("AIR + LoRA", "C0-o"), ("ACIP-style", "C3--x"),
                             ("ACIP-style + LoRA", "C3-o"), ("ACIP-style, own stop", "C1--x"),
                             ("ACIP-style, own stop + LoRA", "C1-o")):  # a marker on every row: one point shows
            xs = [p["budget_tokens"] for p in points if label in p["rows"]]
            ys = [p["rows"][label]["perplexity"][text] for p in points if label in p["rows"]]
            ax.plot(xs, ys, style, label=label)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("training tokens per model")
        ax.set_ylabel(f"{text} perplexity")
        ax.grid(True, which="both", alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.suptitle("Retention 0.6, held-out text; ACIP-style's tokens: mask phase + post-tune + LoRA", fontsize=9)
    save_figure(fig, path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recipe", default=str(ROOT / "recipes" / "smollm2-135m" / "study.yaml"))
    ap.add_argument("--multipliers", type=int, nargs="+", default=[1, 4, 16])
    ap.add_argument("--retention", type=float, default=0.6)
    ap.add_argument("--schedule", default="", help="key=value pairs over the recipe's acip section (k = 1)")
    ap.add_argument("--stop-retention", type=float, default=0.55)
    ap.add_argument("--base-steps", type=int, default=64, help="LoRA steps of AIR + LoRA at k = 1")
    ap.add_argument("--post-tune-steps", type=int, default=4, help="ACIP post-tune steps at k = 1")
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--batch-size", type=int, default=2)
    ap.add_argument("--methods", nargs="+", choices=["air", "acip"], default=["air", "acip"],
                    help="one half of every point (two processes side by side); the JSON and plot then show it alone")
    ap.add_argument("--tasks", nargs="*", default=[], help="zero-shot tasks too (default: perplexity only)")
    ap.add_argument("--own-stop", action="store_true",
                    help="also ACIP-style with its mask phase stopped at --retention itself (its own study per point)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--output", default="acip_budget_smollm2.json")
    args = ap.parse_args()
    try:
        schedule = recipe_schedule(args.recipe, args.schedule)
    except (ValueError, RecipeError) as err:
        ap.error(str(err))
    if any(k < 1 for k in args.multipliers):
        ap.error("--multipliers must be integers >= 1")
    if not 0 < args.stop_retention <= args.retention < 1:
        ap.error("--retention must lie in [stop-retention, 1) and --stop-retention above 0")
    if min(args.base_steps, args.batch_size, args.seq_len - 1) < 1 or args.post_tune_steps < 0:
        ap.error("--base-steps and --batch-size must be >= 1, --seq-len >= 2, --post-tune-steps >= 0")
    if 2 * args.post_tune_steps >= args.base_steps:
        ap.error("--post-tune-steps must stay below half of --base-steps: ACIP's mask phase and LoRA need the rest")
    recipes = []
    try:  # every multiplier's recipe is checked before the first model loads
        for k in sorted(set(args.multipliers)):
            recipes.append((k, load_recipe(args.recipe, overrides(args, k, schedule)),
                            load_recipe(args.recipe, overrides(args, k, schedule, own_stop=True))
                            if args.own_stop else None))
    except RecipeError as err:
        ap.error(str(err))
    set_threads(args.threads)
    points = []
    for k, recipe, own in recipes:
        t0 = time.perf_counter()
        point = summarize(run_study(recipe), k, Path(recipe.output_dir) / "stages")
        if own is not None:
            extra = summarize(run_study(own), k, Path(own.output_dir) / "stages", suffix=", own stop")
            point["rows"].update(extra["rows"])
            point["own_stop"] = {key: extra[key] for key in ("acip_mask_steps", "acip_retention_reached",
                                                             "acip_lora_share")}
        points.append({**point, "wall_seconds": time.perf_counter() - t0})  # this run only: reused stages cost ~0
        p = points[-1]
        reached = ("" if p["acip_mask_steps"] is None else
                   f"ACIP reached {p['acip_retention_reached']:.3f} in {p['acip_mask_steps']} mask steps; ")
        print(f"x{k}: {p['budget_tokens']:,} tokens; {reached}" + "; ".join(
                  f"{label} " + "/".join(f"{v:.1f}" for v in row["perplexity"].values())
                  for label, row in p["rows"].items()), flush=True)
        write_json(args.output, {"settings": vars(args), "environment": environment(), "points": points})
        plot(points, RESULTS / args.output.replace(".json", ".png"))


if __name__ == "__main__":
    main()
