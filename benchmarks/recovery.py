"""LoRA recovery of compressed models: SVD-LLM(W) and AIR, each + LoRA, at equal training tokens.

    python benchmarks/recovery.py --threads 1                              # the whole grid (about 3 CPU-hours)
    python benchmarks/recovery.py --threads 1 --retentions 0.6 --variants factors
    python benchmarks/recovery.py --recipe recipes/qwen2.5-coder-0.5b/recovery.yaml --threads 2 --retentions 0.6 \
        --output recovery_qwen2.5-coder-0.5b.json                          # the default AIR-2S on the second model

The grid is a study recipe, by default ``recipes/smollm2-135m/recovery.yaml`` (its ``study.variants`` are the LoRA
placements; in ``recipes/qwen2.5-coder-0.5b/recovery.yaml`` they are compressions: SVD-LLM(W) as published and the
default AIR-2S), run by ``air_ft.pipeline.run_study`` into ``benchmarks/results/<output stem>/`` (report and stage
markers; a rerun reuses every finished stage, a placement reuses its method's compression). This script reads the
report and writes, per retention, model and placement, the perplexity on the validation and held-out slices before
and after LoRA, the share of the gap to dense that LoRA closed, (before - after) / (before - dense), per text, the
training tokens and seconds, and each + LoRA perplexity as a ratio to SVD-LLM(W) + LoRA's with the same placement:
benchmarks/results/<output> (+ .png).
"""

from __future__ import annotations

import json

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
    write_json,
)

REFERENCE = "svdllm"  # the method every placement and method is set against
TEXTS = (*VALIDATION, *HELD_OUT)


def main() -> None:
    ap = study_parser(__doc__, "recovery.yaml", "recovery_smollm2_study.json",
                      variants="placements")
    args = ap.parse_args()
    recipe, study_dir = study_recipe(ap, args)
    recipe = study_subset(ap, args, recipe, (REFERENCE, reference_variant(recipe.study.variants)))
    from air_ft.pipeline import run_study

    report = run_study(recipe)
    result = recovery_table(report)
    print("\n| retention | model | placement | before (val / held-out) | after LoRA (val / held-out) | gap closed "
          "(held-out) | vs SVD-LLM(W) + LoRA (held-out) | train s |\n" + "|---" * 8 + "|")
    for r in result["rows"]:
        print(f"| {r['retention']} | {r['model']} | {r['placement']} | "
              + " / ".join(f"{r['before'][t]:.2f}" for t in TEXTS) + " | "
              + " / ".join(f"{r['after'][t]:.2f}" for t in TEXTS) + " | "
              + " / ".join(f"{r['gap_closed'][t]:.1%}" for t in HELD_OUT) + " | "
              + " / ".join(f"{r['ratio_to_svdllm_lora'][t]:.3f}" for t in HELD_OUT) + f" | {r['train_seconds']:.0f} |")
    path = write_json(args.output, {"recipe": repo_path(args.recipe), "study": study_dir.name,
                                    **result})
    plot(result, RESULTS / args.output.replace(".json", ".png"))
    print(f"wrote {path} and the study's report in {study_dir}")


def reference_variant(variants: dict) -> str:
    """The first of the study's ``variants`` that SVD-LLM(W) runs with (the reference rows)."""
    return next((v for v, s in variants.items() if REFERENCE in s.get("methods", [REFERENCE])), "")


def gap_closed(dense: float, before: float, after: float) -> float:
    """Fraction of the perplexity gap to the dense model that LoRA recovered: (before - after) / (before - dense)."""
    return (before - after) / (before - dense)


def recovery_table(report: dict) -> dict:
    """A recovery study's ``report.json`` as rows: one per +LoRA row, its model (the method, and the variant where
    the variant changes the compression), its LoRA placement, its compressed and recovered perplexities per text,
    the gap closed per text, its training tokens and seconds, and the ratio of its recovered perplexity to
    SVD-LLM(W) + LoRA's at the same retention and placement."""
    ppl = perplexities(report)
    dense = ppl["dense"]
    variants = report["recipe"]["study"].get("variants") or {}

    def settings(r: dict) -> dict:  # the row's variant
        return variants.get(r.get("variant") or "", {})

    def compression(r: dict) -> tuple:  # what of the row's variant its compression reads
        return r["method"], r["retention"], json.dumps(
            {k: v for k, v in settings(r).items() if k not in ("methods", "lora", "train")}, sort_keys=True)

    compressed = {}  # a placement-only variant shares its method's first compressed row
    for r in report["rows"]:
        if r["method"] != "dense" and not r["lora"]:
            compressed.setdefault(compression(r), ppl[r["name"]])
    rows = []
    for r in (r for r in report["rows"] if r["lora"]):
        before, after = compressed[compression(r)], ppl[r["name"]]
        rows.append({"retention": r["retention"], "method": r["method"],
                     "model": f"{r['method']} ({r['variant']})" if compression(r)[2] != "{}" else r["method"],
                     "placement": settings(r).get("lora", {}).get("placement", report["recipe"]["lora"]["placement"]),
                     "before": before, "after": after,
                     "gap_closed": {t: gap_closed(dense[t], before[t], after[t]) for t in TEXTS},
                     "train_tokens": r["train"]["tokens"], "train_seconds": r["train"]["seconds"]})
    reference = {(r["retention"], r["placement"]): r["after"] for r in rows if r["method"] == REFERENCE}
    for r in rows:
        ref = reference.get((r["retention"], r["placement"]))
        r["ratio_to_svdllm_lora"] = {t: r["after"][t] / ref[t] if ref else float("nan") for t in TEXTS}
    rows.sort(key=lambda r: (-r["retention"], r["method"] != REFERENCE, r["model"], r["placement"]))
    return {"dense": dense, "rows": rows}


def plot(result: dict, path) -> None:
    """Grouped bars: held-out perplexity of each model before and after LoRA, one panel per retention and text."""
    rhos = sorted({r["retention"] for r in result["rows"]}, reverse=True)
    fig, axes = subplots(len(rhos), len(HELD_OUT), 5.5, 3.6)
    for i, rho in enumerate(rhos):
        rows = [r for r in result["rows"] if r["retention"] == rho]
        for j, text in enumerate(HELD_OUT):
            labels, vals, colors = [], [], []
            for model in dict.fromkeys(r["model"] for r in rows):
                mine = [r for r in rows if r["model"] == model]
                labels.append(model)
                vals.append(mine[0]["before"][text])
                colors.append("#999")
                for r in mine:
                    labels.append(f"{model}\n+LoRA[{r['placement']}]")
                    vals.append(r["after"][text])
                    colors.append("#ff7f0e" if r["method"] == REFERENCE else "#1f77b4")
            ax = axes[i][j]
            ax.bar(range(len(vals)), vals, color=colors)
            ax.set_xticks(range(len(vals)), labels, fontsize=7)
            ax.axhline(result["dense"][text], color="k", ls="--", lw=1, label="dense")
            ax.set_ylabel("perplexity")
            ax.set_title(f"retention {rho}, {text} (held out)")
            ax.legend(fontsize=8)
    save_figure(fig, path)


if __name__ == "__main__":
    main()
