"""ACIP-style reduced schedules on SmolLM2-135M, chosen on the validation slices only.

    python benchmarks/acip_schedule.py --threads 1                        # every schedule of the recipe
    python benchmarks/acip_schedule.py --threads 1 --variants study       # one of them

The grid is the study ``recipes/smollm2-135m/acip_schedule.yaml``: each ``study.variants`` entry is an ``acip``
section (the settings of ``air_ft.acip_fit``); its mask phase runs on the calibration split until
``stop_retention``, then the post-tune, and is materialized at every retention (one score map). It runs through
``air_ft.pipeline.run_study`` into ``benchmarks/results/acip_schedule_smollm2_study/`` (report and stage markers; a
rerun reuses every finished stage, and the mask phase of a schedule another study ran is reused from the cache).
This script reads the report and writes, per schedule, the mask steps, the size ratio reached, the training tokens
and the validation and held-out perplexities per retention, with the best schedule per retention on validation (the
geometric mean of the two validation slices): benchmarks/results/acip_schedule_smollm2_study.json.
"""

from __future__ import annotations

import argparse

from common import HELD_OUT, ROOT, VALIDATION, perplexities, study_recipe, study_subset, text_scores, write_json

REFERENCE = ("acip", "study")  # the study's schedule


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recipe", default=str(ROOT / "recipes" / "smollm2-135m" / "acip_schedule.yaml"))
    ap.add_argument("--retentions", type=float, nargs="+", default=[0.8, 0.6, 0.4])
    ap.add_argument("--variants", nargs="+", default=None,
                    help="a subset of the recipe's schedules (the study's schedule is always run)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--output", default="acip_schedule_smollm2_study.json")
    args = ap.parse_args()
    args.methods = None
    recipe, study_dir = study_recipe(ap, args)
    if min(args.retentions) < recipe.acip.stop_retention:
        ap.error(f"--retentions must be >= the recipe's acip.stop_retention ({recipe.acip.stop_retention}): the mask "
                 "phase stops there")
    recipe = study_subset(ap, args, recipe, REFERENCE)
    from air_ft.pipeline import run_study
    from air_ft.pipeline.plan import row_recipe

    report = run_study(recipe)
    ppl = perplexities(report)
    schedules: dict[str, dict] = {}
    for r in (r for r in report["rows"] if r["method"] == "acip"):
        settings = row_recipe(recipe, "acip", r["retention"], recipe.study.variants[r["variant"]]).acip
        c = r["compress"]
        entry = schedules.setdefault(r["variant"], {
            "variant": r["variant"], "acip": vars(settings), "mask_steps": c["mask_steps"],
            "retention_reached": c["retention_reached"], "train_tokens": c["train_tokens"], "retentions": {}})
        entry["retentions"][f"{r['retention']:.2f}"] = {**text_scores(ppl[r["name"]]), "lora_share": c["lora_share"],
                                                        "retention_actual": c["retention_actual"]}
    best = {}
    for key in sorted({k for s in schedules.values() for k in s["retentions"]}, reverse=True):
        best[key] = min((s for s in schedules.values() if key in s["retentions"]),
                        key=lambda s: s["retentions"][key]["validation_score"])["variant"]
    print("\n| schedule | mask steps | reached | train tokens | retention | val britannica | val plays | val geo-mean "
          "| held-out britannica | held-out plays |\n" + "|---" * 10 + "|")
    for s in schedules.values():
        for key, v in s["retentions"].items():
            print(f"| {s['variant']} | {s['mask_steps']} | {s['retention_reached']:.3f} | {s['train_tokens']:,} | "
                  f"{key} | {v['validation'][VALIDATION[0]]:.1f} | {v['validation'][VALIDATION[1]]:.1f} | "
                  f"{v['validation_score']:.1f} | {v['evaluation'][HELD_OUT[0]]:.1f} | "
                  f"{v['evaluation'][HELD_OUT[1]]:.1f} |")
    print(f"\nbest on validation per retention: {best}")
    dense = text_scores(ppl["dense"])
    path = write_json(args.output, {"recipe": str(args.recipe), "study": study_dir.name, "dense": dense,
                                    "schedules": list(schedules.values()), "best_on_validation": best})
    print(f"wrote {path} and the study's report in {study_dir}")


if __name__ == "__main__":
    main()
