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
geometric mean of the two validation slices; a schedule run with several seeds by its mean over them):
benchmarks/results/acip_schedule_smollm2_study.json.
"""

from __future__ import annotations

import json

from common import (
    HELD_OUT,
    VALIDATION,
    geo_mean,
    perplexities,
    repo_path,
    study_parser,
    study_recipe,
    study_subset,
    text_scores,
    write_json,
)

REFERENCE = ("acip", "study")  # the earlier study schedule, always run


def main() -> None:
    ap = study_parser(__doc__, "acip_schedule.yaml", "acip_schedule_smollm2_study.json",
                      methods=False, variants="schedules")
    args = ap.parse_args()
    args.methods = None
    recipe, study_dir = study_recipe(ap, args)
    if min(recipe.study.retentions) < recipe.acip.stop_retention:
        ap.error(f"--retentions must be >= the recipe's acip.stop_retention ({recipe.acip.stop_retention}): the mask "
                 "phase stops there")
    recipe = study_subset(ap, args, recipe, REFERENCE)
    from air_ft.pipeline import run_study
    from air_ft.pipeline.plan import row_recipe

    report = run_study(recipe)
    variants = report["recipe"]["study"]["variants"]  # the directory's joined grid: its earlier variants too
    ppl = perplexities(report)
    schedules: dict[str, dict] = {}
    for r in (r for r in report["rows"] if r["method"] == "acip"):
        settings = row_recipe(recipe, "acip", r["retention"], variants[r["variant"]]).acip
        c = r["compress"]
        entry = schedules.setdefault(r["variant"], {
            "variant": r["variant"], "acip": vars(settings), "mask_steps": c["mask_steps"],
            "retention_reached": c["retention_reached"], "train_tokens": c["train_tokens"], "retentions": {}})
        entry["retentions"][f"{r['retention']:.2f}"] = {**text_scores(ppl[r["name"]]), "lora_share": c["lora_share"],
                                                        "retention_actual": c["retention_actual"]}
    groups = repeats(schedules)
    best = {}
    for key in sorted({k for s in schedules.values() for k in s["retentions"]}, reverse=True):
        scored = [g for g in groups if key in g["retentions"]]
        best[key] = min(scored, key=lambda g: g["retentions"][key]["validation_mean"])["schedule"]
    print("\n| schedule | seed | mask steps | reached | train tokens | retention | val britannica | val plays | "
          "val geo-mean | held-out britannica | held-out plays |\n" + "|---" * 11 + "|")
    for s in schedules.values():
        for key, v in s["retentions"].items():
            print(f"| {s['variant']} | {s['acip']['seed']} | {s['mask_steps']} | {s['retention_reached']:.3f} | "
                  f"{s['train_tokens']:,} | {key} | {v['validation'][VALIDATION[0]]:.1f} | "
                  f"{v['validation'][VALIDATION[1]]:.1f} | {v['validation_score']:.1f} | "
                  f"{v['evaluation'][HELD_OUT[0]]:.1f} | {v['evaluation'][HELD_OUT[1]]:.1f} |")
    print("\n| schedule | seeds | retention | val geo-mean: mean (min - max) | held-out geo-mean: mean |\n"
          + "|---" * 5 + "|")
    for g in groups:
        for key, v in g["retentions"].items():
            print(f"| {g['schedule']} | {len(g['variants'])} | {key} | {v['validation_mean']:.1f} "
                  f"({v['validation_min']:.1f} - {v['validation_max']:.1f}) | {v['evaluation_mean']:.1f} |")
    print(f"\nbest on validation per retention (mean over seeds): {best}")
    dense = text_scores(ppl["dense"])
    path = write_json(args.output, {"recipe": repo_path(args.recipe), "study": study_dir.name, "dense": dense,
                                    "schedules": list(schedules.values()), "repeats": groups,
                                    "best_on_validation": best})
    print(f"wrote {path} and the study's report in {study_dir}")


def repeats(schedules: dict[str, dict]) -> list[dict]:
    """The schedules grouped by their acip settings without the seed (each group one schedule, its members repeats
    with other seeds), named by the member with the lowest seed; per retention the validation geo-mean's mean, min
    and max over the seeds and the held-out geo-mean's mean (the validation mean is what a schedule is chosen by)."""
    groups: dict[str, dict] = {}
    for s in sorted(schedules.values(), key=lambda s: s["acip"]["seed"]):
        key = json.dumps({k: v for k, v in s["acip"].items() if k != "seed"}, sort_keys=True)
        g = groups.setdefault(key, {"schedule": s["variant"], "variants": [], "retentions": {}})
        g["variants"].append(s["variant"])
        for r, v in s["retentions"].items():
            g["retentions"].setdefault(r, []).append(v)
    for g in groups.values():
        for r, vals in g["retentions"].items():
            val = [v["validation_score"] for v in vals]
            g["retentions"][r] = {"validation_mean": sum(val) / len(val), "validation_min": min(val),
                                  "validation_max": max(val), "seeds": len(val),
                                  "evaluation_mean": sum(geo_mean(v["evaluation"].values()) for v in vals) / len(vals)}
    return list(groups.values())


if __name__ == "__main__":
    main()
