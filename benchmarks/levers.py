"""Compression-quality levers on SmolLM2-135M: each setting against the paper's SVD-LLM(W), on validation first.

    python benchmarks/levers.py --threads 2                        # 0.8 / 0.6 / 0.4, every variant of the recipe
    python benchmarks/levers.py --retentions 0.6 0.4

The grid is the study ``recipes/smollm2-135m/levers.yaml`` (SVD-LLM(W) and AIR, each with the ``study.variants``
of that recipe: today the output-side weighting ``output_weight`` 0 / 0.5 / 1), run by
``air_ft.pipeline.run_study`` into ``benchmarks/results/levers_smollm2/`` (its report and stage markers; a rerun
reuses every finished stage). This script then reads the report and writes, per row, the perplexity on the
validation slices and on the held-out ones, each as a ratio to SVD-LLM(W) with the paper's protocol (the
``svdllm`` row of the ``input`` variant at the same retention: input-only whitening, uniform ranks, statistics
from the dense model), and the seconds of calibration and factoring. A setting is chosen on the validation slices
(the geometric mean of the two perplexities) only; the held-out slices are reported beside them. Writes
benchmarks/results/levers_smollm2.json (+ .png).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from common import (
    HELD_OUT,
    RESULTS,
    ROOT,
    VALIDATION,
    geo_mean,
    perplexities,
    save_figure,
    set_threads,
    subplots,
    write_json,
)

REFERENCE = ("svdllm", "input")  # SVD-LLM(W) as the paper runs it


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recipe", default=str(ROOT / "recipes" / "smollm2-135m" / "levers.yaml"))
    ap.add_argument("--retentions", type=float, nargs="+", default=[0.8, 0.6, 0.4])
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--output", default="levers_smollm2.json")
    args = ap.parse_args()
    for r in args.retentions:
        if not 0 < r < 1:
            ap.error(f"--retentions must lie strictly between 0 and 1, got {r}")
    set_threads(args.threads)
    from air_ft.config import load_recipe
    from air_ft.pipeline import run_study

    study_dir = RESULTS / Path(args.output).stem
    recipe = load_recipe(args.recipe, [f"output_dir={study_dir}",
                                       f"study.retentions=[{','.join(map(str, args.retentions))}]"])
    if REFERENCE[1] not in recipe.study.variants or REFERENCE[0] not in recipe.study.methods:
        ap.error(f"the recipe must hold method {REFERENCE[0]!r} and a variant {REFERENCE[1]!r} (the reference)")
    report = run_study(recipe)
    ppl = perplexities(report)
    rows = []
    for r in (r for r in report["rows"] if r["method"] != "dense"):
        ref = ppl[f"{REFERENCE[0]}-r{r['retention']:.2f}-{REFERENCE[1]}"]
        mine = ppl[r["name"]]
        rows.append({
            "method": r["method"], "variant": r["variant"], "retention": r["retention"],
            "settings": recipe.study.variants[r["variant"]],
            "validation": {t: mine[t] for t in VALIDATION}, "evaluation": {t: mine[t] for t in HELD_OUT},
            "validation_score": geo_mean(mine[t] for t in VALIDATION),
            "ratio_to_svdllm": {t: mine[t] / ref[t] for t in (*VALIDATION, *HELD_OUT)},
            "calibration_seconds": r["compress"]["calibration_seconds"],
            "compression_seconds": r["compress"]["compression_seconds"],
            "calibration_cached": r["compress"].get("calibration_cached")})
    dense = {"validation": {t: ppl["dense"][t] for t in VALIDATION},
             "evaluation": {t: ppl["dense"][t] for t in HELD_OUT}}
    best = {}
    for method in recipe.study.methods:
        for retention in args.retentions:
            cells = [r for r in rows if r["method"] == method and r["retention"] == retention]
            best[f"{method}-r{retention:.2f}"] = min(cells, key=lambda r: r["validation_score"])["variant"]
    votes = {v: sum(b == v for k, b in best.items() if k.startswith("air-")) for v in recipe.study.variants}
    chosen = max(votes, key=votes.get)
    print("\n| method | retention | variant | val britannica | val plays | val geo-mean | val ratio to SVD-LLM(W) | "
          "held-out britannica | held-out plays | held-out ratio | factoring s |\n" + "|---" * 11 + "|")
    for r in sorted(rows, key=lambda r: (-r["retention"], r["method"], r["variant"])):
        v, e, q = r["validation"], r["evaluation"], r["ratio_to_svdllm"]
        print(f"| {r['method']} | {r['retention']} | {r['variant']} | {v['val_britannica']:.2f} | "
              f"{v['val_plays']:.2f} | {r['validation_score']:.2f} | {q['val_britannica']:.3f} / "
              f"{q['val_plays']:.3f} | {e['britannica']:.2f} | {e['plays']:.2f} | {q['britannica']:.3f} / "
              f"{q['plays']:.3f} | {r['compression_seconds']:.0f} |")
    print(f"\ndense: validation {dense['validation']}, evaluation {dense['evaluation']}")
    print(f"best on validation per cell: {best}\nAIR's cells vote {votes} -> {chosen}")
    path = write_json(args.output, {"recipe": str(Path(args.recipe).relative_to(ROOT)), "study": study_dir.name,
                                    "reference": "-".join(REFERENCE), "dense": dense, "rows": rows,
                                    "best_on_validation": best, "air_votes": votes, "air_choice": chosen})
    fig, axes = subplots(1, 2, 4.5, 3.4)
    for ax, split in zip(axes[0], HELD_OUT):
        for method, marker in (("svdllm", "o"), ("air", "s")):
            for variant, style in zip(recipe.study.variants, ("-", "--", ":", "-.")):
                pts = sorted((r["retention"], r["evaluation"][split]) for r in rows
                             if r["method"] == method and r["variant"] == variant)
                if pts:
                    ax.plot(*zip(*pts), marker + style, label=f"{method}, {variant}")
        ax.axhline(dense["evaluation"][split], color="grey", lw=0.8, label="dense")
        ax.set_yscale("log")
        ax.set_xlabel("retention")
        ax.set_ylabel(f"held-out perplexity, {split}")
    axes[0][0].legend(fontsize=7)
    save_figure(fig, RESULTS / args.output.replace(".json", ".png"))
    print(f"wrote {path} and the study's report in {study_dir}")


if __name__ == "__main__":
    main()
