"""The study as data: :func:`plan` turns a recipe into the list of stages that ``air-ft run`` executes.

A stage is a value (:class:`Stage`): what it does (``kind``), the row it belongs to, the key of everything its
result depends on, the stages whose outputs it reads, the directory it writes and whether every process of a
launcher runs it. Planning loads nothing and runs nothing, so a test can inspect a study's plan in microseconds;
:mod:`air_ft.pipeline.execute` runs a plan, reusing every stage whose directory holds its key.

Keys come from the recipe's own fields (``air_ft.config.result_fields``): a field that changes a result keys its
section's stage, and a stage's key includes the keys of the stages it reads, so a change flows downstream.
"""

from __future__ import annotations

import dataclasses
import importlib
from dataclasses import dataclass
from pathlib import Path

from air_ft.config import VARIANT_SECTIONS, Recipe, result_fields, to_dict
from air_ft.errors import RecipeError
from air_ft.methods import METHODS, neutral_settings
from air_ft.pipeline.cache import stage_key

__all__ = ["Stage", "Row", "plan", "check_study", "lora_budget", "KINDS"]

KINDS = ("compress", "train", "eval", "efficiency", "serve", "report")


@dataclass(frozen=True)
class Row:
    """One row of the report: a model and how it was made."""

    name: str  # "dense", "air-r0.60", "air-r0.60+lora" (with variants: "air-r0.60-<variant>")
    method: str  # "dense" or a METHODS name
    retention: float
    lora: bool
    variant: str = ""  # a study.variants name ("" without variants)


@dataclass(frozen=True)
class Stage:
    """One stage of a study.

    Attributes:
        kind: one of :data:`KINDS`.
        name: the row it serves (``air-r0.60``; ``air-r0.60+lora`` for the evaluation of the recovered model);
            the kind's own name for the efficiency and report stages.
        key: the hash of everything its result depends on.
        path: its output directory.
        inputs: the ids (``kind/name``) of the stages whose outputs it reads.
        all_ranks: every process of a launcher runs it together (compression shares its matrices out, training is
            data-parallel); otherwise the main process runs it and the others read its result.
        recipe: the recipe it runs with (the study's, with this row's method and retention).
        row: for an ``eval`` stage, the report row it fills.
    """

    kind: str
    name: str
    key: str
    path: Path
    inputs: tuple[str, ...]
    all_ranks: bool
    recipe: Recipe
    row: Row | None = None

    @property
    def id(self) -> str:
        return f"{self.kind}/{self.name}"


def row_recipe(recipe: Recipe, method: str, retention: float, variant: dict | None = None) -> Recipe:
    """The study's recipe with one grid point's method, retention and variant settings: the variant's plain keys in
    its ``compress`` section, its ``train`` / ``lora`` / ``acip`` maps in those sections (each validated as the
    section is). The settings a method does not read are left neutral on its rows
    (:func:`air_ft.methods.neutral_settings`), so one study compares every method with a lever on."""
    variant = variant or {}
    sections = {k: dataclasses.replace(getattr(recipe, k), **v) for k, v in variant.items() if k in VARIANT_SECTIONS}
    settings = {"method": method, "retention": float(retention),
                **{k: v for k, v in variant.items() if k not in VARIANT_SECTIONS}, **neutral_settings(METHODS[method])}
    return dataclasses.replace(recipe, compress=dataclasses.replace(recipe.compress, **settings), **sections)


def plan(recipe: Recipe) -> list[Stage]:
    """Every stage of the study in ``recipe``, in an order that runs each after the stages it reads.

    The rows: dense (``study.dense``), then for every retention, method (and ``study.variants`` entry) a
    compressed row and, where ``study.lora`` recovers the method, its LoRA-recovered row (a variant whose settings
    leave a method's compression as an earlier variant's, such as the output weight for plain SVD, adds no row of
    that method). Every row is evaluated
    alike; with ``eval.efficiency`` one stage measures speed and size of every distinct layer shape, with
    ``eval.serve`` one stage serves every row's checkpoint with vLLM; the report comes last.
    """
    out = Path(recipe.output_dir) / "stages"
    model, data = result_fields(recipe.model), to_dict(recipe.data)
    eval_fields = (result_fields(recipe.eval), data["evaluation"])
    stages: list[Stage] = []

    def evaluate(row: Row, source: Stage | None, source_key: str, rec: Recipe) -> None:
        stages.append(Stage("eval", row.name, stage_key("eval", source_key, eval_fields), out / "eval" / row.name,
                            (source.id,) if source else (), False, rec, row))

    if recipe.study.dense:
        evaluate(Row("dense", "dense", 1.0, False), None, stage_key("dense", model), recipe)
    variants = recipe.study.variants or {"": {}}
    # a variant that changes nothing a method's compression reads is not a new compressed row of it (the output
    # weight of plain SVD), and one that changes nothing its training reads is not a new recovered row either
    made: dict[str, Stage] = {}
    trained: set[str] = set()
    for retention, name, variant in ((r, m, v) for r in recipe.study.retentions for m in recipe.study.methods
                                     for v in variants if m in variants[v].get("methods", [m])):
        settings = {k: v for k, v in variants[variant].items() if k != "methods"}
        method, rec = METHODS[name], row_recipe(recipe, name, retention, settings)
        row = f"{name}-r{float(retention):.2f}" + (f"-{variant}" if variant else "")
        parts = [model, data["calibration"], result_fields(rec.compress)]
        if method.trains:  # its own training settings change what it produces
            parts.append(result_fields(rec.acip))
        if method.revision:
            parts.append({"revision": method.revision})
        key = stage_key("compress", *parts)
        comp = made.get(key)
        if comp is None:
            comp = made[key] = Stage("compress", row, key, out / "compress" / row, (), not method.trains, rec)
            stages.append(comp)
            evaluate(Row(row, name, float(retention), False, variant), comp, comp.key, rec)
        if not recipe.study.recovers(name):
            continue
        budget = [result_fields(rec.train), result_fields(rec.lora), model]
        if method.trains and recipe.study.equal_tokens:  # its LoRA steps depend on what it trained on
            budget.append({"equal_tokens": True})
        train_key = stage_key("train", comp.key, *budget)
        if train_key in trained:
            continue
        trained.add(train_key)
        train = Stage("train", row, train_key, out / "train" / row, (comp.id,), True, rec)
        stages.append(train)
        evaluate(Row(f"{row}+lora", name, float(retention), True, variant), train, train.key, rec)
    evals = [s for s in stages if s.kind == "eval"]
    if recipe.eval.efficiency:
        sources = {s.name: s.key for s in evals}
        measure = importlib.import_module("air_ft.efficiency").MEMORY_MEASURE  # how peak memory is read
        stages.append(Stage("efficiency", "efficiency",
                            stage_key("efficiency", sources, result_fields(recipe.eval, "efficiency"), model, measure),
                            out / "efficiency", tuple(s.id for s in evals), False, recipe))
    if recipe.eval.serve:  # vLLM serves each row's checkpoint (greedy agreement depends on its values)
        sources = {s.name: s.key for s in evals}
        stages.append(Stage("serve", "serve", stage_key("serve", sources, result_fields(recipe.eval, "serve"), model),
                            out / "serve", tuple(s.id for s in evals), False, recipe))
    stages.append(Stage("report", "report", stage_key("report", [s.key for s in stages]), Path(recipe.output_dir),
                        tuple(s.id for s in stages if s.kind in ("eval", "efficiency", "serve")), False, recipe))
    return stages


def lora_budget(recipe: Recipe, spent: int, name: str, num_processes: int = 1):
    """The ``train`` section a recovered row trains with. With ``study.equal_tokens`` every recovered row spends
    ``train.max_steps`` steps' worth of tokens in all: ``spent`` (what the method trained on while compressing:
    ACIP's mask phase and post-tune) comes off its LoRA steps."""
    train = recipe.train
    if not spent or not recipe.study.equal_tokens:
        return train
    per_step = train.step_tokens(num_processes)
    steps = (train.max_steps * per_step - spent) // per_step
    if steps < 1:
        raise RecipeError(f"{name}: compressing already trained on {spent:,} tokens, the whole LoRA budget of "
                          f"{train.max_steps * per_step:,} (train.max_steps {train.max_steps} x {per_step:,}): raise "
                          "train.max_steps, shorten the mask phase (acip.max_steps, acip.post_tune_steps) or set "
                          "study.equal_tokens=false")
    return dataclasses.replace(train, max_steps=int(steps))


def check_study(recipe: Recipe) -> None:
    """Every refusal a study can know of before it loads a model."""
    from air_ft.pipeline.commands import check_eval

    if recipe.eval.serve:
        import importlib.util

        from air_ft.serving import INSTALL, ServeError

        if importlib.util.find_spec("vllm") is None:
            raise ServeError(f"eval.serve needs vLLM, which is not installed: {INSTALL}; or set eval.serve=false")
    if not recipe.data.evaluation and not recipe.eval.tasks:
        raise RecipeError("nothing to evaluate: give data.evaluation texts and/or eval.tasks")
    needs_cal = [m for m in recipe.study.methods if METHODS[m].calibrates] or recipe.study.lora
    if needs_cal and not recipe.data.calibration:
        raise RecipeError("data.calibration is empty: the study's methods (and LoRA) need calibration text")
    for r in recipe.study.retentions:  # the compress section validates each grid point
        dataclasses.replace(recipe.compress, retention=float(r))
    trainers = [m for m in recipe.study.methods if METHODS[m].trains]
    if trainers:
        a = recipe.acip
        least = (1 + a.post_tune_steps) * a.batch_size * a.seq_len  # one mask step, then the post-tune
        if (any(recipe.study.recovers(m) for m in trainers) and recipe.study.equal_tokens
                and least >= recipe.train.max_steps * recipe.train.step_tokens()):
            raise RecipeError(f"ACIP's post-tune alone ({a.post_tune_steps} steps x {a.batch_size} x {a.seq_len} "
                              f"tokens) uses the whole LoRA budget of every recovered row (train.max_steps "
                              f"{recipe.train.max_steps} x {recipe.train.step_tokens():,} tokens): raise "
                              "train.max_steps, lower acip.post_tune_steps or set study.equal_tokens=false")
        if min(recipe.study.retentions) < a.stop_retention:
            raise RecipeError(f"study.retentions go down to {min(recipe.study.retentions)} but acip.stop_retention "
                              f"is {a.stop_retention}: ACIP can only materialize sizes its mask phase reached; "
                              "lower acip.stop_retention")
    check_eval(recipe)
