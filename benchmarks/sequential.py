"""``compress.sequential`` on and off: SVD-LLM(W) and AIR on SmolLM2-135M at several retentions.

    python benchmarks/sequential.py --threads 1                  # 0.6 and 0.4, both methods
    python benchmarks/sequential.py --retentions 0.6 --methods air

The grid is the study ``recipes/smollm2-135m/sequential.yaml`` (two ``study.variants``: ``sequential: true`` and
``false``), run by ``air_ft.pipeline.run_study`` into ``benchmarks/results/sequential_smollm2/`` (its report and
stage markers; a rerun reuses every finished stage). This script then reads the report: with ``false`` every
block's Grams come from the dense model's activations, with ``true`` from those the already compressed blocks before
it produce (GPTQ / SVD-LLM V2 style). The default is chosen on the validation slices (the geometric mean of the two
perplexities); the held-out slices are reported beside them and play no part in the choice. Writes
benchmarks/results/sequential_smollm2.json (+ .png).
"""

from __future__ import annotations

import argparse

from common import (
    RESULTS,
    ROOT,
    perplexities,
    plot_held_out,
    repo_path,
    study_recipe,
    text_scores,
    write_json,
)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recipe", default=str(ROOT / "recipes" / "smollm2-135m" / "sequential.yaml"))
    ap.add_argument("--methods", nargs="+", default=["svdllm", "air"], choices=["svdllm", "air", "asvd"])
    ap.add_argument("--retentions", type=float, nargs="+", default=[0.6, 0.4])
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--output", default="sequential_smollm2.json")
    args = ap.parse_args()
    recipe, study_dir = study_recipe(ap, args, f"study.methods=[{','.join(args.methods)}]")
    from air_ft.pipeline import run_study

    report = run_study(recipe)
    ppl = perplexities(report)
    rows = [{"method": r["method"], "retention": r["retention"], "sequential": r["variant"] == "sequential",
             **text_scores(ppl[r["name"]]),
             "seconds": r["compress"]["calibration_seconds"] + r["compress"]["compression_seconds"]}
            for r in report["rows"] if r["method"] != "dense"]
    dense = {k: v for k, v in text_scores(ppl["dense"]).items() if k != "validation_score"}
    wins = []
    for retention in args.retentions:
        for method in args.methods:
            off, on = (next(r for r in rows if r["method"] == method and r["retention"] == retention
                            and r["sequential"] is s) for s in (False, True))
            wins.append({"method": method, "retention": retention, "validation_off": off["validation_score"],
                         "validation_on": on["validation_score"],
                         "winner": "sequential" if on["validation_score"] < off["validation_score"] else "dense"})
    on_votes = sum(w["winner"] == "sequential" for w in wins)
    print("\n| method | retention | sequential | val britannica | val plays | val geo-mean | eval britannica | "
          "eval plays |\n|---|---|---|---|---|---|---|---|")
    for r in rows:
        v, e = r["validation"], r["evaluation"]
        print(f"| {r['method']} | {r['retention']} | {r['sequential']} | {v['val_britannica']:.2f} | "
              f"{v['val_plays']:.2f} | {r['validation_score']:.2f} | {e['britannica']:.2f} | {e['plays']:.2f} |")
    print(f"\ndense: validation {dense['validation']}, evaluation {dense['evaluation']}")
    print(f"validation prefers sequential in {on_votes} of {len(wins)} cells -> default sequential: "
          f"{on_votes * 2 > len(wins)}")
    path = write_json(args.output, {"recipe": repo_path(args.recipe), "study": study_dir.name,
                                    "dense": dense, "rows": rows, "comparison": wins,
                                    "default_sequential": on_votes * 2 > len(wins)})
    plot_held_out(rows, dense, [(f"{m}, sequential {str(q).lower()}",
                                 lambda r, m=m, q=q: r["method"] == m and r["sequential"] is q,
                                 {"marker": "s" if q else "o", "linestyle": "--" if q else "-"})
                                for m in args.methods for q in (False, True)],
                  RESULTS / args.output.replace(".json", ".png"))
    print(f"wrote {path} and the study's report in {study_dir}")


if __name__ == "__main__":
    main()
