"""Run a study's plan (:func:`air_ft.pipeline.plan.plan`): each stage once, reusing every finished one.

:func:`run_study` is ``air-ft run``. The executor walks the plan in order; a stage whose directory holds its key
is reused, any other is done (and a killed training stage resumes from its Trainer checkpoints). A finished
stage whose files are gone (a results-only copy of a study, as committed to a repository: markers and logs
without checkpoints) is redone on the main process only when a later stage needs its files.

A run into a directory that already holds a study adds to it: the report keeps every row of the directory's
earlier grid (its ``recipe.resolved.yaml``) whose stages finished under this recipe's keys, so a run of one method
beside a finished grid reports the whole grid; rows the changed settings invalidate are left out, not mixed in.
"""

from __future__ import annotations

import copy
import dataclasses
import time
from pathlib import Path

from air_ft import dist
from air_ft.config import Recipe, load_recipe, to_dict
from air_ft.errors import RecipeError
from air_ft.pipeline import commands
from air_ft.pipeline.cache import StageDir, stage_key
from air_ft.pipeline.plan import Stage, check_study, lora_budget, plan
from air_ft.pipeline.provenance import run_metadata, save_resolved, study_provenance

__all__ = ["run_study", "Executor", "setup", "widened"]


def run_study(recipe: Recipe) -> dict:
    """``air-ft run``: dense (optional), every method x retention of ``study``, each optionally LoRA-recovered,
    evaluated alike; then ``report.json``, ``report.md`` and plots in ``output_dir``. Returns the report.

    The report also holds the finished rows of the grid an earlier run left in ``output_dir`` (:func:`widened`)."""
    check_study(recipe)
    return Executor(recipe, plan(recipe), grid=widened(recipe)).run()


def widened(recipe: Recipe) -> Recipe | None:
    """``recipe`` with its grid (methods, retentions, dense, LoRA) joined to the grid of the study already in its
    ``output_dir`` (``recipe.resolved.yaml``), or None where there is none, it cannot be read, or it adds nothing.

    Only the grid is joined (variants too, where a name both grids hold means the same settings in each): every
    other setting is this recipe's, so an earlier row enters the report only if its stages finished with the keys
    this recipe gives them."""
    path = Path(recipe.output_dir) / "recipe.resolved.yaml"
    if not path.exists():
        return None
    try:
        before = load_recipe(str(path)).study
    except (RecipeError, OSError, ValueError):  # written by another version: its rows cannot be keyed, leave them
        return None
    now = recipe.study

    def settings(v: dict) -> dict:
        return {k: x for k, x in v.items() if k != "methods"}  # which methods a variant applies to is grid

    both = set(now.variants) & set(before.variants)
    if any(settings(now.variants[v]) != settings(before.variants[v]) for v in both):
        return None  # one name, two settings: the earlier rows of that name cannot be told from this run's
    if bool(now.variants) != bool(before.variants):
        return None  # a grid of variants and one without name their rows differently

    def join(a: list, b: list) -> list:
        return list(a) + [x for x in b if x not in a]

    lora = True if True in (now.lora, before.lora) else join(now.lora or [], before.lora or []) or False
    variants = {v: dict(x) for v, x in now.variants.items()}
    for v, x in before.variants.items():
        if v not in variants:
            variants[v] = dict(x)
        elif "methods" in variants[v]:  # a variant run for some methods keeps the others it was run for
            if "methods" in x:
                variants[v]["methods"] = join(variants[v]["methods"], x["methods"])
            else:
                del variants[v]["methods"]
    grid = dataclasses.replace(now, methods=join(now.methods, before.methods),
                               retentions=join([float(r) for r in now.retentions],
                                               [float(r) for r in before.retentions]),
                               dense=now.dense or before.dense, lora=lora, variants=variants)
    return None if grid == now else dataclasses.replace(recipe, study=grid)


class Executor:
    """Runs the stages of one plan in order and keeps their results (``stage.id -> result``)."""

    def __init__(self, recipe: Recipe, stages: list[Stage], grid: Recipe | None = None):
        """``grid``: the recipe with the grid joined to the directory's earlier one (:func:`widened`): the finished
        evaluations of its plan are reported beside this plan's rows (nothing of it runs), and it is the recipe
        the directory and its report record."""
        from accelerate import PartialState

        dist.init_from_env()
        self.recipe, self.stages, self.grid = recipe, stages, grid or recipe
        # the joined grid's plan, with the measurements an earlier run may have made (they key no evaluation)
        self.earlier = plan(dataclasses.replace(grid, eval=dataclasses.replace(
            grid.eval, efficiency=True, serve=True))) if grid is not None else None
        self.by_id = {s.id: s for s in stages}
        self.results: dict[str, dict] = {}
        self.state = PartialState()
        self._dense = None
        self._texts: dict[str, str] | None = None
        self._shapes: dict[str, str] = {}

    def run(self) -> dict:
        if self.state.is_main_process:
            save_resolved(self.grid, Path(self.recipe.output_dir))
        for stage in self.stages:
            if stage.kind == "report":
                stage = self._with_earlier_rows(stage)
            self.results[stage.id] = getattr(self, f"_{stage.kind}")(stage)
        return self.results["report/report"]

    def _with_earlier_rows(self, report: Stage) -> Stage:
        """The report stage, reading also the earlier grid's evaluations that finished under this recipe's keys
        (each with the stages it was made by), in the joined grid's order."""
        if not self.earlier:
            return report
        kept, left = [], []
        earlier = {s.id: s for s in self.earlier}
        for stage in self.earlier:
            if stage.kind != "eval" or stage.id in self.by_id:
                continue
            chain = [stage]
            while chain[-1].inputs:
                chain.append(earlier[chain[-1].inputs[0]])
            done = [StageDir(s.path, s.key).cached() for s in chain]
            if any(d is None for d in done):
                left.append(stage.name)
                continue
            for s, d in zip(chain, done):
                self.by_id.setdefault(s.id, s)
                self.results.setdefault(s.id, d)
            kept.append(stage.name)
        if not kept:
            return report
        if self.state.is_main_process:
            print(f"[air-ft] report: also {len(kept)} rows this directory holds from an earlier run ("
                  f"{', '.join(kept)})" + (f"; not {', '.join(left)}: not finished under these settings" if left
                                          else ""), flush=True)
        rows = [s.id for s in self.earlier if s.kind == "eval" and s.id in self.by_id]
        rows += [sid for sid in report.inputs if sid.startswith("eval/") and sid not in rows]
        others = [sid for sid in report.inputs if not sid.startswith("eval/")]
        for stage in self.earlier:  # a speed or serving measurement of the joined grid that still holds
            if stage.kind in ("efficiency", "serve") and stage.id not in self.by_id:
                done = StageDir(stage.path, stage.key).cached()
                if done is not None:
                    self.by_id[stage.id], self.results[stage.id] = stage, done
                    others.append(stage.id)
        return dataclasses.replace(report, inputs=tuple(rows + others))

    # ------------------------------------------------------------------------------------------ shared inputs

    def dense(self):
        if self._dense is None:
            self._dense = commands.load_dense(self.recipe)
        return self._dense

    def eval_texts(self) -> dict[str, str]:
        if self._texts is None:
            self._texts = {name: commands.texts([spec])[0] for name, spec in self.recipe.data.evaluation.items()}
        return self._texts

    # --------------------------------------------------------------------------------------------- the cache

    def _run(self, stage: Stage, label: str, work) -> dict:
        """``work(path)`` unless the stage directory holds a finished stage with its key; print what happened.

        Under a launcher with several processes the main process does the work and the others wait and read its
        result, except for ``all_ranks`` stages, which every process runs together.
        """
        cache = StageDir(stage.path, stage.key)
        done = cache.cached()
        if done is not None:
            if self.state.is_main_process:
                print(f"[air-ft] {label}: reused {stage.path}", flush=True)
            return done
        if self.state.is_main_process:
            print(f"[air-ft] {label} ...", flush=True)
            cache.begin()
        if stage.all_ranks:
            self.state.wait_for_everyone()
        result = None
        if stage.all_ranks or self.state.is_main_process:
            t0 = time.perf_counter()
            result = work(stage.path)
            seconds = time.perf_counter() - t0
            if self.state.is_main_process:
                print(f"[air-ft] {label}: done in {seconds:.0f} s", flush=True)
                result = cache.finish({**result, "seconds": seconds}, seconds)
        self.state.wait_for_everyone()
        return result if self.state.is_main_process else cache.cached()

    def _ensure(self, stage: Stage, collective: bool = False) -> Path:
        """The stage's artifact (a checkpoint directory), redone on the main process when its files are gone.
        ``collective``: every process calls this and waits for the main one."""
        from air_ft.checkpoint import MARKER

        artifact = stage.path / ("checkpoint" if stage.kind == "compress" else "merged")
        if not (artifact / MARKER).exists() and self.state.is_main_process:
            if stage.kind == "train":
                self._ensure(self.by_id[stage.inputs[0]])  # training reads the compressed checkpoint
                if self.state.num_processes > 1:
                    raise RecipeError(f"{artifact} is missing: rebuild it with one process (air-ft run without "
                                      f"accelerate launch), or delete {stage.path} to retrain it with all of them")
            label = f"{'compress' if stage.kind == 'compress' else 'LoRA-recover'} {stage.name}"
            print(f"[air-ft] {label}: {artifact} is not here; redoing the stage", flush=True)
            cache = StageDir(stage.path, stage.key)
            cache.begin()
            t0 = time.perf_counter()
            with dist.local():
                result = self._work(stage)(stage.path)
            seconds = time.perf_counter() - t0
            cache.finish({**result, "seconds": seconds}, seconds)
        if collective:
            self.state.wait_for_everyone()
        return artifact

    def _load(self, source: str | None):
        """The model a stage reads: the dense one, or a stage's checkpoint."""
        if source is None:
            return self.dense()
        return commands.load_any(self._ensure(self.by_id[source]), self.recipe)

    # ------------------------------------------------------------------------------------------------ stages

    def _work(self, stage: Stage):
        """The function that does a compress or train stage's work in its directory."""
        if stage.kind == "compress":
            def compress(path: Path) -> dict:
                # perplexity belongs to the evaluate stage: the compress stage evaluates nothing
                rec = dataclasses.replace(stage.recipe, output_dir=str(path / "checkpoint"),
                                          data=dataclasses.replace(stage.recipe.data, evaluation={}))
                return dataclasses.asdict(commands.compress(rec, dense=self.dense()))
            return compress
        source = self.by_id[stage.inputs[0]]
        spent = self.results[source.id]["info"].get("train_tokens", 0)  # ACIP's mask phase and post-tune
        budget = lora_budget(stage.recipe, spent, stage.name, self.state.num_processes)

        def train(path: Path) -> dict:
            rec = dataclasses.replace(stage.recipe, output_dir=str(path), train=dataclasses.replace(
                budget, compressed_path=str(source.path / "checkpoint")))
            return dataclasses.asdict(commands.train(rec))
        return train

    def _compress(self, stage: Stage) -> dict:
        return self._run(stage, f"compress {stage.name}", self._work(stage))

    def _train(self, stage: Stage) -> dict:
        if StageDir(stage.path, stage.key).cached() is None:  # training reads the compressed checkpoint
            self._ensure(self.by_id[stage.inputs[0]], collective=True)
        return self._run(stage, f"LoRA-recover {stage.name}", self._work(stage))

    def _eval(self, stage: Stage) -> dict:
        source = stage.inputs[0] if stage.inputs else None

        def work(path: Path) -> dict:
            model, tok = self._load(source)
            return commands.evaluate_model(model, tok, self.recipe, self.eval_texts(), with_efficiency=False)

        return self._run(stage, f"evaluate {stage.name}", work)

    def shape(self, stage: Stage) -> str:
        """A key of the layer shapes of an evaluation stage's model: speed and size depend on them alone."""
        if stage.id not in self._shapes:
            self._shapes[stage.id] = self._shape(stage)
        return self._shapes[stage.id]

    def _shape(self, stage: Stage) -> str:
        if not stage.inputs:
            return "dense"
        source = self.by_id[stage.inputs[0]]
        made = source if source.kind == "compress" else self.by_id[source.inputs[0]]
        factored = stage_key("shape", self.results[made.id]["info"].get("ranks") or made.key)
        lora = self.recipe.lora  # a merge into the factors (or truncated back to rank k) keeps every shape
        same = source.kind == "compress" or lora.placement == "factors" or lora.merge == "truncate"
        return factored if same else stage_key("shape", factored, to_dict(lora))

    def _efficiency(self, stage: Stage) -> dict:
        """Every distinct shape measured in turns in one process, on its first model: ratios from one run.

        A compressed model whose checkpoint is not here (a results-only copy of a study) is measured as the dense
        model factored at its ranks map (:func:`air_ft.efficiency.factored_at`: the same shapes, so the same size,
        FLOPs, memory and speed) rather than compressed again; each result says which it measured (``built_from``).
        """
        import tempfile

        from air_ft.efficiency import compare

        firsts: dict[str, Stage] = {}
        for sid in stage.inputs:
            firsts.setdefault(self.shape(self.by_id[sid]), self.by_id[sid])
        ev = self.recipe.eval

        def work(path: Path) -> dict:
            built: dict[str, str] = {}
            with tempfile.TemporaryDirectory(prefix="air_ft_shapes_") as tmp:
                loaders = {s.name: (lambda s=s: self._measured(s, Path(tmp), built)) for s in firsts.values()}
                out = compare(loaders, rounds=ev.efficiency_rounds, batch_sizes=tuple(ev.decode_batch_sizes))
            return {name: {**res, "built_from": built[name]} for name, res in out.items()}

        return self._run(stage, "measure speed and size", work)

    def _measured(self, stage: Stage, tmp: Path, built: dict[str, str]):
        """The model whose speed and size ``stage``'s row reports (see :meth:`_efficiency`)."""
        import air_ft
        from air_ft.checkpoint import MARKER
        from air_ft.efficiency import factored_at

        source = self.by_id[stage.inputs[0]] if stage.inputs else None
        ranks = self.results[source.id]["info"].get("ranks") if source and source.kind == "compress" else None
        if source is None or not ranks or (source.path / "checkpoint" / MARKER).exists():
            built[stage.name] = "dense model" if source is None else "checkpoint"
            return self._load(source.id if source else None)
        saved = tmp / stage.name
        if not (saved / MARKER).exists():  # factored once, read back in every round like a checkpoint
            model, tok = self.dense()
            air_ft.save_compressed(factored_at(copy.deepcopy(model), ranks), tok, saved)
        built[stage.name] = "the dense model factored at the row's ranks map (its checkpoint is not here)"
        return air_ft.load_compressed(saved, device=self.recipe.model.device)

    def _serve(self, stage: Stage) -> dict:
        """Every row's checkpoint served with vLLM in turn, in this process: ratios against dense from one run."""
        from air_ft.serving.measure import serve_recipe

        def work(path: Path) -> dict:
            rows = [self.by_id[sid] for sid in stage.inputs]
            checkpoints = {r.name: self._ensure(self.by_id[r.inputs[0]]) if r.inputs else None for r in rows}
            return serve_recipe(self.recipe, checkpoints, self.dense(), self.eval_texts(), path)

        return self._run(stage, "serve with vLLM", work)

    def _report(self, stage: Stage) -> dict:
        from air_ft.report import write_report

        rows = [self.row(self.by_id[sid]) for sid in stage.inputs if sid.startswith("eval/")]
        report = {"title": f"air_ft study: {self.recipe.model.name_or_path} {self.recipe.model.gguf_file or ''}"
                           .strip(),
                  "setup": setup(self.recipe), "rows": rows, "recipe": to_dict(self.grid),
                  "environment": run_metadata(self.recipe),
                  "provenance": study_provenance(self.recipe, self.eval_texts(), rows)}
        if self.state.is_main_process:
            write_report(report, stage.path)
        return report

    def row(self, stage: Stage) -> dict:
        """The report row of an evaluation stage: how its model was made, and everything measured on it."""
        row = stage.row
        out: dict = {"name": row.name, "method": row.method, "retention": row.retention, "lora": row.lora}
        if row.variant:
            out["variant"] = row.variant
        if stage.inputs:
            source = self.by_id[stage.inputs[0]]
            compress = self.results[source.inputs[0] if source.kind == "train" else source.id]
            info = compress["info"]
            tokens = {"calibration": info.get("calibration_tokens", 0), "training": info.get("train_tokens", 0)}
            out["compress"] = info
            if source.kind == "train":
                trained = self.results[source.id]
                out.update(train=trained, tokens={**tokens, "training": tokens["training"] + trained["tokens"]},
                           train_log=commands.read_log(source.path / "train_log.jsonl"))
            else:
                out["tokens"] = tokens
        out.update(self.results[stage.id])
        measured = self.results.get("efficiency/efficiency")
        if measured is not None:
            first = next((s for s in self.by_id.values() if s.kind == "eval" and measured.get(s.name) is not None
                          and self.shape(s) == self.shape(stage)), None)
            if first is not None:
                out["efficiency"] = {**measured[first.name], "measured_on": first.name}
        served = self.results.get("serve/serve")
        if served is not None and served.get(row.name) is not None:
            out["serve"] = served[row.name]
        return out


def setup(recipe: Recipe) -> dict:
    """The report's description of how every row was made and measured."""
    c, t, e = recipe.compress, recipe.train, recipe.eval
    return {"model": recipe.model.name_or_path + (f" ({recipe.model.gguf_file})" if recipe.model.gguf_file else ""),
            "dtype": recipe.model.dtype, "device": recipe.model.device,
            "calibration_tokens": c.num_samples * c.seq_len, "calibration": f"{c.num_samples} x {c.seq_len} tokens, "
            f"seed {c.seed}", "lora_train_tokens": t.max_steps * t.step_tokens() if recipe.study.lora else 0,
            "equal_tokens": recipe.study.equal_tokens,
            "lora": (f"{recipe.lora.placement}, r {recipe.lora.rank}, {t.max_steps} steps x {t.batch_size} x "
                     f"{t.seq_len} tokens, lr {t.learning_rate}, distill {t.distill}" if recipe.study.lora else None),
            "perplexity": f"{e.seq_len}-token windows" + (f", {e.max_windows} evenly spaced per text"
                                                          if e.max_windows else ", whole text"),
            "tasks": list(e.tasks), "task_limit": e.limit, "seed": e.seed,
            "retention_counts": "parameters of the compressed decoder linear layers only; whole-model counts in "
                                "the params column"}
