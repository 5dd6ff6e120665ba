"""LoRA recovery of compressed SmolLM2-135M: SVD-LLM(W) and AIR, each + LoRA with the adapters on the factors and on
the whole layer, at equal training tokens.

    python benchmarks/recovery.py --threads 1                              # the whole grid (about 3 CPU-hours)
    python benchmarks/recovery.py --threads 1 --retentions 0.6 --variants factors

The grid is the study ``recipes/smollm2-135m/recovery.yaml`` (its ``study.variants`` are the LoRA placements), run
by ``air_ft.pipeline.run_study`` into ``benchmarks/results/recovery_smollm2_study/`` (report and stage markers; a
rerun reuses every finished stage, a placement reuses its method's compression). This script reads the report and
writes, per retention, method and placement, the perplexity on the validation and held-out slices before and after
LoRA, the share of the gap to dense that LoRA closed, (before - after) / (before - dense), per text, the training
tokens and seconds, and AIR + LoRA's perplexity as a ratio to SVD-LLM(W) + LoRA's with the same placement:
benchmarks/results/recovery_smollm2_study.json (+ .png).
"""

from __future__ import annotations

from common import (
    HELD_OUT,
    RESULTS,
    VALIDATION,
    perplexities,
    save_figure,
    study_parser,
    study_recipe,
    study_subset,
    subplots,
    write_json,
)

REFERENCE = ("svdllm", "factors")  # the row every placement and method is set against
TEXTS = (*VALIDATION, *HELD_OUT)


def main() -> None:
    ap = study_parser(__doc__, "recovery.yaml", [0.6, 0.4], "recovery_smollm2_study.json",
                      variants="placements")
    args = ap.parse_args()
    recipe, study_dir = study_recipe(ap, args)
    recipe = study_subset(ap, args, recipe, REFERENCE)
    from air_ft.pipeline import run_study

    report = run_study(recipe)
    result = recovery_table(report)
    print("\n| retention | method | placement | before (val / held-out) | after LoRA (val / held-out) | gap closed "
          "(held-out) | vs SVD-LLM(W) + LoRA (held-out) | train s |\n" + "|---" * 8 + "|")
    for r in result["rows"]:
        print(f"| {r['retention']} | {r['method']} | {r['placement']} | "
              + " / ".join(f"{r['before'][t]:.2f}" for t in TEXTS) + " | "
              + " / ".join(f"{r['after'][t]:.2f}" for t in TEXTS) + " | "
              + " / ".join(f"{r['gap_closed'][t]:.1%}" for t in HELD_OUT) + " | "
              + " / ".join(f"{r['ratio_to_svdllm_lora'][t]:.3f}" for t in HELD_OUT) + f" | {r['train_seconds']:.0f} |")
    path = write_json(args.output, {"recipe": "recipes/smollm2-135m/recovery.yaml", "study": study_dir.name,
                                    **result})
    plot(result, RESULTS / args.output.replace(".json", ".png"))
    print(f"wrote {path} and the study's report in {study_dir}")


def gap_closed(dense: float, before: float, after: float) -> float:
    """Fraction of the perplexity gap to the dense model that LoRA recovered: (before - after) / (before - dense)."""
    return (before - after) / (before - dense)


def recovery_table(report: dict) -> dict:
    """A recovery study's ``report.json`` as rows: one per (retention, method, placement) with a +LoRA row, its
    compressed and recovered perplexities per text, the gap closed per text, its training tokens and seconds, and
    the ratio of its recovered perplexity to SVD-LLM(W) + LoRA's at the same retention and placement."""
    ppl = perplexities(report)
    dense = ppl["dense"]
    compressed = {(r["method"], r["retention"]): ppl[r["name"]] for r in report["rows"]
                  if r["method"] != "dense" and not r["lora"]}
    rows = []
    for r in (r for r in report["rows"] if r["lora"]):
        before, after = compressed[r["method"], r["retention"]], ppl[r["name"]]
        rows.append({"retention": r["retention"], "method": r["method"], "placement": r["variant"] or "factors",
                     "before": before, "after": after,
                     "gap_closed": {t: gap_closed(dense[t], before[t], after[t]) for t in TEXTS},
                     "train_tokens": r["train"]["tokens"], "train_seconds": r["train"]["seconds"]})
    reference = {(r["retention"], r["placement"]): r["after"] for r in rows if r["method"] == REFERENCE[0]}
    for r in rows:
        ref = reference.get((r["retention"], r["placement"]))
        r["ratio_to_svdllm_lora"] = {t: r["after"][t] / ref[t] if ref else float("nan") for t in TEXTS}
    rows.sort(key=lambda r: (-r["retention"], r["method"] != REFERENCE[0], r["method"], r["placement"]))
    return {"dense": dense, "rows": rows}


def plot(result: dict, path) -> None:
    """Grouped bars: held-out perplexity of each model before and after LoRA, one panel per retention and text."""
    rhos = sorted({r["retention"] for r in result["rows"]}, reverse=True)
    fig, axes = subplots(len(rhos), len(HELD_OUT), 5.5, 3.6)
    for i, rho in enumerate(rhos):
        rows = [r for r in result["rows"] if r["retention"] == rho]
        for j, text in enumerate(HELD_OUT):
            labels, vals, colors = [], [], []
            for method in dict.fromkeys(r["method"] for r in rows):
                mine = [r for r in rows if r["method"] == method]
                labels.append(method)
                vals.append(mine[0]["before"][text])
                colors.append("#999")
                for r in mine:
                    labels.append(f"{method}\n+LoRA[{r['placement']}]")
                    vals.append(r["after"][text])
                    colors.append("#ff7f0e" if method == REFERENCE[0] else "#1f77b4")
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
