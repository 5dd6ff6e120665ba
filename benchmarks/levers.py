"""Compression-quality levers on SmolLM2-135M: each setting against the paper's SVD-LLM(W), on validation first.

    python benchmarks/levers.py --threads 2                        # 0.8 / 0.6 / 0.4, every variant of the recipe
    python benchmarks/levers.py --retentions 0.6 0.4 --methods air --variants input global

The grid is the study ``recipes/smollm2-135m/levers.yaml`` (SVD-LLM(W) and AIR, each with the ``study.variants``
of that recipe: today the output-side weighting ``output_weight`` 0 / 0.5 / 1), run by
``air_ft.pipeline.run_study`` into ``benchmarks/results/levers_smollm2/`` (its report and stage markers; a rerun
reuses every finished stage). This script then reads the report and writes, per row, the perplexity on the
validation slices and on the held-out ones, each as a ratio to SVD-LLM(W) with the paper's protocol (the
``svdllm`` row of the ``input`` variant at the same retention: input-only whitening, uniform ranks, statistics
from the dense model), and the seconds of calibration and factoring. A setting is chosen on the validation slices
(the geometric mean of the two perplexities) only; the held-out slices are reported beside them. Writes
benchmarks/results/levers_smollm2.json (+ .png); a run over a part of the grid keeps the rows an earlier part wrote
there.
"""

from __future__ import annotations

import json

from common import (
    HELD_OUT,
    RESULTS,
    VALIDATION,
    perplexities,
    plot_held_out,
    repo_path,
    study_parser,
    study_recipe,
    study_subset,
    text_scores,
    write_json,
)

REFERENCE = ("svdllm", "input")  # SVD-LLM(W) as the paper runs it


def main() -> None:
    ap = study_parser(__doc__, "levers.yaml", "levers_smollm2.json")
    args = ap.parse_args()
    recipe, study_dir = study_recipe(ap, args)
    from air_ft.pipeline import run_study

    every_variant = dict(recipe.study.variants)
    recipe = study_subset(ap, args, recipe, REFERENCE)
    report = run_study(recipe)
    variants = report["recipe"]["study"]["variants"]  # the directory's joined grid: its earlier variants too
    ppl = perplexities(report)
    rows = []
    for r in (r for r in report["rows"] if r["method"] != "dense"):
        ref = ppl[f"{REFERENCE[0]}-r{r['retention']:.2f}-{REFERENCE[1]}"]
        mine = ppl[r["name"]]
        rows.append({
            "method": r["method"], "variant": r["variant"], "retention": r["retention"],
            "settings": _settings(variants[r["variant"]]), **text_scores(mine),
            "ratio_to_svdllm": {t: mine[t] / ref[t] for t in (*VALIDATION, *HELD_OUT)},
            "calibration_seconds": r["compress"]["calibration_seconds"],
            "compression_seconds": r["compress"]["compression_seconds"],
            "calibration_cached": r["compress"].get("calibration_cached"),
            **({"delta_auto": r["compress"]["delta_auto"]} if "delta_auto" in r["compress"] else {})})
    dense = {k: v for k, v in text_scores(ppl["dense"]).items() if k != "validation_score"}
    rows = _with_earlier_rows(rows, args.output, study_dir.name, every_variant)
    best = {}  # per retention: the method and variant best on validation
    for retention in sorted({r["retention"] for r in rows}, reverse=True):
        top = min((r for r in rows if r["retention"] == retention), key=lambda r: r["validation_score"])
        best[f"r{retention:.2f}"] = f"{top['method']}-{top['variant']}"
    votes = {c: sum(b == c for b in best.values()) for c in sorted(set(best.values()))}
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
    print(f"best on validation per retention: {best} -> {chosen}")
    path = write_json(args.output, {"recipe": repo_path(args.recipe), "study": study_dir.name,
                                    "reference": "-".join(REFERENCE), "dense": dense, "rows": rows,
                                    "best_on_validation": best, "votes": votes, "choice": chosen})
    styles = ("-", "--", ":", "-.", (0, (3, 1, 1, 1, 1, 1)), (0, (5, 5)), (0, (1, 3)), (0, (6, 2)))
    shown = sorted({(r["method"], r["variant"]) for r in rows})
    plot_held_out(rows, dense, [(f"{m}, {v}", lambda r, m=m, v=v: r["method"] == m and r["variant"] == v,
                                 {"marker": "os"[m == "air"], "linestyle": styles[j % len(styles)]})
                                for j, (m, v) in enumerate(shown)],
                  RESULTS / args.output.replace(".json", ".png"))
    print(f"wrote {path} and the study's report in {study_dir}")


def _settings(variant: dict) -> dict:
    """A variant's compress settings (without ``methods``, the rows it applies to)."""
    return {k: v for k, v in variant.items() if k != "methods"}


def _with_earlier_rows(rows: list[dict], output: str, study: str, variants: dict) -> list[dict]:
    """``rows`` and the rows an earlier run of the same study wrote to ``output`` that this run did not redo (a part
    of the grid at a time), as long as their variant's settings are still the recipe's."""
    path = RESULTS / output
    if not path.exists():
        return rows
    old = json.loads(path.read_text())
    if old.get("study") != study:
        return rows
    done = {(r["method"], r["variant"], r["retention"]) for r in rows}
    kept = [r for r in old["rows"] if (r["method"], r["variant"], r["retention"]) not in done
            and _settings(variants.get(r["variant"], {})) == r["settings"]]
    return kept + rows


if __name__ == "__main__":
    main()
