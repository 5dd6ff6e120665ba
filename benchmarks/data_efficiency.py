"""Data efficiency: held-out perplexity against the number of calibration windows, SVD-LLM(W) against AIR.

    python benchmarks/data_efficiency.py --threads 2                  # every row of the recipe, at 0.6
    python benchmarks/data_efficiency.py --methods air --variants n8 n16

The AIR paper claims that AIR matches SVD-LLM(W) with about ten times fewer calibration samples. The grid is the
study ``recipes/smollm2-135m/data_efficiency.yaml``: SVD-LLM(W) and AIR with 8, 16, 32, 64 and 128 calibration
windows of 512 tokens (variants ``n<N>``, the paper's protocol) and the library's default settings at the same
counts (variants ``default-n<N>``), run by ``air_ft.pipeline.run_study`` into
``benchmarks/results/data_efficiency_smollm2/`` (a rerun reuses every finished stage). This script reads the
report and writes, per method, setting and window count, the validation and held-out perplexities, the ratio to
SVD-LLM(W) with 128 windows, and for each series the fewest windows at which it is at or below that reference on
both held-out texts. Writes benchmarks/results/data_efficiency_smollm2.json (+ .png).
"""

from __future__ import annotations

import re

from common import (
    HELD_OUT,
    RESULTS,
    VALIDATION,
    perplexities,
    repo_path,
    save_figure,
    study_parser,
    study_recipe,
    study_subset,
    subplots,
    text_scores,
    write_json,
)

REFERENCE = ("svdllm", "n128")  # SVD-LLM(W), the paper's protocol, with the most calibration data


def main() -> None:
    ap = study_parser(__doc__, "data_efficiency.yaml", "data_efficiency_smollm2.json")
    args = ap.parse_args()
    recipe, study_dir = study_recipe(ap, args)
    recipe = study_subset(ap, args, recipe, REFERENCE)
    for name, settings in recipe.study.variants.items():
        if "num_samples" not in settings or not re.fullmatch(r"(.+-)?n\d+", name):
            ap.error(f"variant {name!r} must set num_samples and be named n<N> or <setting>-n<N>")
    from air_ft.pipeline import run_study

    report = run_study(recipe)
    variants = report["recipe"]["study"]["variants"]  # the directory's joined grid: its earlier variants too
    ppl = perplexities(report)
    rows = []
    for r in (r for r in report["rows"] if r["method"] != "dense"):
        ref = ppl[f"{REFERENCE[0]}-r{r['retention']:.2f}-{REFERENCE[1]}"]
        settings = variants[r["variant"]]
        family = r["variant"].rpartition("-")[0] or "paper"
        rows.append({"method": r["method"], "setting": family, "variant": r["variant"], "retention": r["retention"],
                     "windows": settings["num_samples"], "settings": settings, **text_scores(ppl[r["name"]]),
                     "ratio_to_reference": {t: ppl[r["name"]][t] / ref[t] for t in (*VALIDATION, *HELD_OUT)},
                     "calibration_tokens": r["compress"]["calibration_tokens"],
                     "calibration_seconds": r["compress"]["calibration_seconds"],
                     "compression_seconds": r["compress"]["compression_seconds"]})
    series = sorted({(r["method"], r["setting"], r["retention"]) for r in rows})
    matches = {}
    for method, setting, retention in series:
        mine = sorted((r for r in rows if (r["method"], r["setting"], r["retention"]) == (method, setting, retention)),
                      key=lambda r: r["windows"])
        enough = [r["windows"] for r in mine if all(r["ratio_to_reference"][t] <= 1 for t in HELD_OUT)]
        matches[f"{method}-{setting}-r{retention:.2f}"] = enough[0] if enough else None
    print("\n| method | setting | retention | windows | val geo-mean | held-out britannica | held-out plays | "
          "ratio to SVD-LLM(W) x128 (held out) | calibration s |\n" + "|---" * 9 + "|")
    for r in sorted(rows, key=lambda r: (-r["retention"], r["method"], r["setting"], r["windows"])):
        e, q = r["evaluation"], r["ratio_to_reference"]
        print(f"| {r['method']} | {r['setting']} | {r['retention']} | {r['windows']} | {r['validation_score']:.2f} | "
              f"{e['britannica']:.2f} | {e['plays']:.2f} | {q['britannica']:.3f} / {q['plays']:.3f} | "
              f"{r['calibration_seconds']:.0f} |")
    print(f"\nfewest windows at or below SVD-LLM(W) with 128 on both held-out texts: {matches}")
    dense = text_scores(ppl["dense"]) if "dense" in ppl else None
    path = write_json(args.output, {"recipe": repo_path(args.recipe), "study": study_dir.name,
                                    "reference": "-".join(REFERENCE), "rows": rows, "matches_reference_at": matches,
                                    "dense": dense})
    _plot(rows, series, RESULTS / args.output.replace(".json", ".png"))
    print(f"wrote {path} and the study's report in {study_dir}")


def _plot(rows: list[dict], series, path) -> None:
    fig, axes = subplots(1, 2, 4.5, 3.4)
    for ax, text in zip(axes[0], HELD_OUT):
        for method, setting, retention in series:
            pts = sorted((r["windows"], r["evaluation"][text]) for r in rows
                         if (r["method"], r["setting"], r["retention"]) == (method, setting, retention))
            ax.plot(*zip(*pts), marker="os"[method == "air"], linestyle="-" if setting == "paper" else "--",
                    label=f"{method}, {setting}" + (f", {retention}" if len({s[2] for s in series}) > 1 else ""))
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("calibration windows (x 512 tokens)")
        ax.set_ylabel(f"held-out perplexity, {text}")
    axes[0][0].legend(fontsize=7)
    save_figure(fig, path)


if __name__ == "__main__":
    main()
