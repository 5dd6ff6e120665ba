"""LoRA recovery fine-tuning of a factored model: ``finetune`` and the one training path it shares with the
``air-ft train`` stage (:func:`train_adapters`; the stage itself is :func:`air_ft.stages.run_train`).

The path reads top to bottom: wrap in PEFT LoRA (:mod:`air_ft.lora`) -> initialize the adapters -> build the
training data -> TRL ``SFTTrainer`` -> train; ``finetune`` then merges in memory, the stage saves the adapters and
merges from the saved files.

Why TRL's ``SFTTrainer`` (a ``transformers.Trainer`` subclass): it brings instruction data for free (prompt /
completion and conversational records, loss on the completion only via ``completion_only_loss``) and everything
the ``Trainer`` does (accelerate / DeepSpeed / FSDP launch, gradient accumulation and checkpointing, cosine schedule
with warm-up, periodic held-out evaluation, checkpoints and ``resume_from_checkpoint``, tqdm progress). For raw text
we pack the fixed-length blocks ourselves (:func:`text_blocks`) and hand SFTTrainer tokenized ``input_ids``, which
it uses as they are: that fixes the exact number of training tokens, keeps each source's share equal (a short
encyclopaedia next to a long corpus of plays would otherwise be a few per cent of the blocks), and gives every
method of a comparison the very same blocks. We wrap the model in PEFT ourselves rather than passing
``peft_config`` because the ``layer`` placement needs a custom LoRA layer registered on the config.

Distributed traps handled (DeepSpeed ZeRO-3): adapters are kept in the base dtype (``autocast_adapter_dtype`` off,
ZeRO-3 wants one dtype), the adapter file is checked for empty tensors after saving (ZeRO-3 saves empty shards
unless ``stage3_gather_16bit_weights_on_model_save`` is on, which ``zero3_save_16bit_model: true`` in
``accelerate_configs/deepspeed_zero3.yaml`` sets),
and merges gather partitioned parameters first (:func:`air_ft.lora.gathered`); ``run_train`` merges from the saved
files on the main process, so no partitioned tensor is ever merged.
"""

from __future__ import annotations

import dataclasses
import json
import tempfile
import warnings
from pathlib import Path

import torch
from torch import nn
from transformers import TrainerCallback, set_seed

from air_ft.config import LoraConfig, TrainConfig
from air_ft.errors import AssetError, CheckpointError, RecipeError
from air_ft.lora import apply_lora, lora_budget, merge_lora, residual_init
from air_ft.modeling import prepare_model
from air_ft.train_data import build_datasets, check_text_weights, instruction_dataset, text_blocks

__all__ = ["finetune", "train_adapters", "TrainedAdapters", "text_blocks", "build_trainer", "instruction_dataset",
           "LossLog", "save_adapters", "ADAPTER_MARKER"]

ADAPTER_MARKER = "air_ft_adapter.json"


def use_bf16(flag: bool | None) -> bool:
    """bf16 mixed precision: on by default only on a CUDA device that supports it (CPU trains in fp32)."""
    if flag is None:
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    return bool(flag)


class LossLog(TrainerCallback):
    """Append every Trainer log entry (loss, learning rate, eval loss) to a JSON-lines file on the main process."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_world_process_zero and logs:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.path, "a") as fh:
                fh.write(json.dumps({"step": state.global_step, **logs}) + "\n")


def distillation_loss(logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor, weight: float,
                      temperature: float = 1.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Summed next-token loss ``(1 - weight) * CE + weight * T^2 * KL(teacher || student)`` over labelled positions.

    Returns ``(loss_sum, ce_sum, kl_sum, tokens)``; positions whose (shifted) label is -100 are ignored, exactly as
    in the language-modeling loss, so instruction data distils on the completion only.
    """
    target = labels[:, 1:]
    mask = target != -100
    student = logits[:, :-1][mask].float()
    teacher = teacher_logits[:, :-1][mask].float()
    ce = nn.functional.cross_entropy(student, target[mask], reduction="sum")
    s_logp = torch.log_softmax(student / temperature, dim=-1)
    t_logp = torch.log_softmax(teacher / temperature, dim=-1)
    kl = (t_logp.exp() * (t_logp - s_logp)).sum()
    loss = (1.0 - weight) * ce + weight * temperature**2 * kl
    return loss, ce.detach(), kl.detach(), mask.sum()


_MODEL_INPUTS = ("input_ids", "attention_mask", "position_ids")


def _trainer_class(distill: bool):
    """``SFTTrainer``, or its subclass whose training loss adds distillation from a frozen dense teacher."""
    from trl import SFTTrainer

    if not distill:
        return SFTTrainer

    class DistillSFTTrainer(SFTTrainer):
        """Training loss mixes CE with KL to the teacher's next-token distribution; evaluation loss stays plain CE."""

        def __init__(self, *args, teacher: nn.Module, weight: float, temperature: float, **kwargs) -> None:
            super().__init__(*args, **kwargs)
            self.teacher = teacher.to(self.args.device).eval().requires_grad_(False)
            self.weight, self.temperature = weight, temperature
            self._sums = torch.zeros(3, dtype=torch.float64)  # ce, kl, tokens since the last log

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            if not model.training:  # held-out loss: the plain LM loss, comparable across runs
                return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            feed = {k: inputs[k] for k in _MODEL_INPUTS if k in inputs}
            outputs = model(**feed, use_cache=False)
            with torch.no_grad():
                teacher_logits = self.teacher(**feed, use_cache=False).logits
            loss, ce, kl, tokens = distillation_loss(outputs.logits, teacher_logits, inputs["labels"], self.weight,
                                                     self.temperature)
            self._sums += torch.stack([ce, kl, tokens]).double().cpu()
            loss = loss / torch.as_tensor(num_items_in_batch if num_items_in_batch is not None else tokens).clamp(
                min=1).to(loss.device)
            if self.args.average_tokens_across_devices and num_items_in_batch is not None:
                loss = loss * self.accelerator.num_processes  # as Trainer: DDP averages the gradients across ranks
            return (loss, outputs) if return_outputs else loss

        def log(self, logs: dict, *args, **kwargs) -> None:
            if "loss" in logs and self._sums[2] > 0:
                logs = {**logs, "ce": float(self._sums[0] / self._sums[2]), "kl": float(self._sums[1] / self._sums[2])}
                self._sums.zero_()
            super().log(logs, *args, **kwargs)

    return DistillSFTTrainer


def build_trainer(model: nn.Module, tok, train_ds, eval_ds, cfg: TrainConfig, output_dir: str | Path,
                  callbacks: list | None = None, teacher: nn.Module | None = None, trainer_cls=None,
                  trainer_kwargs: dict | None = None, args_overrides: dict | None = None):
    """TRL ``SFTTrainer`` on an already PEFT-wrapped model (``cfg.lr_scheduler`` with warm-up, fp32 on CPU).

    With ``cfg.distill > 0`` the training loss adds KL divergence to ``teacher`` (the dense model) over the same
    positions as the LM loss (:func:`distillation_loss`). ``trainer_cls`` (a subclass of ``SFTTrainer``) and its
    extra ``trainer_kwargs`` replace that choice (ACIP's mask phase uses it); ``args_overrides`` set further
    ``SFTConfig`` fields (ACIP: no gradient clipping).
    """
    from trl import SFTConfig

    bf16 = use_bf16(cfg.bf16)
    has_eval = eval_ds is not None and cfg.eval_steps > 0
    # transformers 5 renamed gradient_checkpointing* to activation_checkpointing* (the old names warn)
    ckpt = ("activation_checkpointing" if "activation_checkpointing" in {f.name for f in dataclasses.fields(SFTConfig)}
            else "gradient_checkpointing")
    checkpointing = {ckpt: cfg.gradient_checkpointing,
                     f"{ckpt}_kwargs": {"use_reentrant": False} if cfg.gradient_checkpointing else None}
    args = SFTConfig(
        **checkpointing,
        output_dir=str(output_dir), max_steps=cfg.max_steps, learning_rate=cfg.learning_rate,
        lr_scheduler_type=cfg.lr_scheduler, warmup_steps=cfg.warmup_ratio, per_device_train_batch_size=cfg.batch_size,
        per_device_eval_batch_size=cfg.batch_size, gradient_accumulation_steps=cfg.grad_accum,
        bf16=bf16, fp16=False, use_cpu=not torch.cuda.is_available(),
        eval_strategy="steps" if has_eval else "no", eval_steps=cfg.eval_steps if has_eval else None,
        save_strategy="steps" if cfg.save_steps > 0 else "no", save_steps=cfg.save_steps or cfg.max_steps,
        logging_steps=cfg.logging_steps, logging_first_step=True, seed=cfg.seed, data_seed=cfg.seed,
        report_to="none", max_length=cfg.seq_len, packing=False, dataset_text_field="text",
        completion_only_loss=True if cfg.data_format == "instruction" else None,
        dataloader_num_workers=0, remove_unused_columns=True, weight_decay=0.0, disable_tqdm=not cfg.progress,
        **(args_overrides or {}),
    )
    if cfg.gradient_checkpointing:
        model.enable_input_require_grads()  # frozen embeddings: checkpointed blocks need an input that requires grad
    extra = {}
    if cfg.distill > 0:
        if teacher is None:
            raise RecipeError("train.distill > 0 needs the dense teacher model (finetune(..., teacher=dense_model))")
        extra = {"teacher": teacher, "weight": cfg.distill, "temperature": cfg.distill_temperature}
    cls = trainer_cls or _trainer_class(cfg.distill > 0)
    return cls(model=model, args=args, train_dataset=train_ds, eval_dataset=eval_ds if has_eval else None,
               processing_class=tok, callbacks=callbacks or [], **extra, **(trainer_kwargs or {}))


def calibration_stats(dense: nn.Module, tok, texts: list[str], cfg=None):
    """The calibration statistics (Grams) of ``dense`` on ``texts`` drawn as ``cfg`` (a
    :class:`~air_ft.config.CompressConfig`, its defaults if None) says: the disk cache, else a forward pass."""
    from air_ft.compress import get_stats
    from air_ft.config import CompressConfig
    from air_ft.modeling import find_targets

    cfg = cfg or CompressConfig()
    return get_stats(dense, tok, texts, find_targets(dense, cfg.include, cfg.exclude), cfg, influence=False)


def init_adapters(peft_model, init: str, teacher: nn.Module | None, tok, texts: list[str],
                  compress_cfg=None, stats=None) -> dict | None:
    """Apply ``lora.init``: nothing for ``zero``; for ``residual``, :func:`air_ft.lora.residual_init` with the
    dense ``teacher``'s weights and the calibration Grams (``stats``, else :func:`calibration_stats` over
    ``texts`` with ``compress_cfg``). Returns a summary of the residual before and after."""
    if init == "zero":
        return None
    if teacher is None:
        raise RecipeError("lora.init 'residual' needs the dense model the factored one came from "
                          "(finetune(..., teacher=dense_model); air-ft train loads it from model.name_or_path)")
    if stats is None:
        stats = calibration_stats(teacher, tok, texts, compress_cfg)
    report = residual_init(peft_model, teacher, {n: stats.gram(n) for n in stats.group_of},
                           compress_cfg.eps if compress_cfg else 0.0)
    before = sum(b for b, _ in report.values()) / len(report)
    after = sum(a for _, a in report.values()) / len(report)
    print(f"adapters start at the compression residual: mean relative whitened error {before:.4f} -> {after:.4f}")
    return {"layers": len(report), "mean_error_before": before, "mean_error_after": after}


@dataclasses.dataclass
class TrainedAdapters:
    """What :func:`train_adapters` hands back: the trainer, the PEFT-wrapped model and the run's bookkeeping."""

    trainer: object
    peft_model: nn.Module
    result: object
    budget: dict
    init_report: dict | None
    log: list


def train_adapters(model: nn.Module, tok, train_src, eval_src, cfg: TrainConfig, lcfg: LoraConfig, out_dir: Path, *,
                   weights: list[float] | None = None, world: int = 1, teacher: nn.Module | None = None,
                   init_texts: list[str] | None = None, compress_cfg=None, stats=None, resume_from: str | None = None,
                   callbacks: list | None = None, autocast_adapter_dtype: bool = True) -> TrainedAdapters:
    """The one training path of :func:`finetune` and ``air-ft train``: wrap in PEFT LoRA, initialize the adapters,
    build the data and TRL's trainer, train (resuming from ``resume_from``). Checkpoints go to
    ``out_dir/checkpoints``, the loss log to ``out_dir/train_log.jsonl``. The model is wrapped in place."""
    from accelerate import PartialState

    set_seed(cfg.seed)  # adapter initialization (lora_A) is random
    peft_model = apply_lora(model, lcfg.placement, lcfg.rank, lcfg.alpha, lcfg.dropout, lcfg.targets, lcfg.merge,
                            autocast_adapter_dtype=autocast_adapter_dtype)
    init_report = None
    if not resume_from:  # a resumed run loads its adapters from the checkpoint
        init_report = init_adapters(peft_model, lcfg.init, teacher, tok, init_texts, compress_cfg, stats)
    budget = lora_budget(peft_model)
    if PartialState().is_main_process:
        print(f"LoRA ({lcfg.placement}, r={lcfg.rank}): {budget['trainable_params']:,} trainable parameters; "
              f"retention {budget['retention']:.3f} without adapters, {budget['retention_with_adapters']:.3f} with")
    train_ds, eval_ds = build_datasets(tok, cfg, train_src, eval_src, world, weights)
    trainer = build_trainer(peft_model, tok, train_ds, eval_ds, cfg, out_dir / "checkpoints",
                            [LossLog(out_dir / "train_log.jsonl"), *(callbacks or [])], teacher=teacher)
    result = trainer.train(resume_from_checkpoint=resume_from)
    return TrainedAdapters(trainer, peft_model, result, budget, init_report, list(trainer.state.log_history))


@dataclasses.dataclass
class FinetuneSummary:
    """What :func:`finetune` did.

    Attributes:
        budget: the adapters' parameter count and its share of the factored model (:func:`air_ft.lora.lora_budget`).
        train_loss: the Trainer's mean training loss.
        log: every logged step (loss, learning rate, held-out loss, KL when distilling).
        init: how the adapters started (``zero``, or the residual initialization's record).
        tokens: training tokens, ``max_steps x batch_size x grad_accum x seq_len``.
    """

    budget: dict
    train_loss: float
    log: list
    init: dict | None
    tokens: int


def finetune(model: nn.Module, tok, texts: list[str], max_steps: int = 100, lora_rank: int = 8,
             learning_rate: float = 2e-4, seq_len: int = 512, batch_size: int = 4, seed: int = 0,
             placement: str = "factors", lora_alpha: float | None = None, lora_dropout: float = 0.0,
             merge: str = "exact", eval_texts: list[str] | None = None, output_dir: str | None = None,
             teacher: nn.Module | None = None, lora_init: str = "zero", stats=None,
             text_weights: list[float] | None = None, return_summary: bool = False,
             **train_options) -> nn.Module | tuple[nn.Module, FinetuneSummary]:
    """LoRA recovery fine-tuning from Python; returns the merged factored model, ready to evaluate.

    Args:
        model: a model compressed by :func:`air_ft.compress` (LowRankLinear layers). It is wrapped and merged
            in place: keep a copy if the un-tuned model is still needed.
        tok: its tokenizer.
        texts: raw training texts, packed into ``seq_len`` blocks (equal share per text).
        text_weights: relative share of the training blocks per text (default: equal).
        max_steps, learning_rate, seq_len, batch_size, seed: as in :class:`air_ft.config.TrainConfig`; trains on
            ``max_steps * batch_size * grad_accum`` blocks of ``seq_len`` tokens.
        lora_rank, lora_alpha, lora_dropout, placement, merge: as in :class:`air_ft.config.LoraConfig`
            (``lora_alpha`` defaults to ``2 * lora_rank``).
        lora_init: ``zero`` or ``residual`` (``layer`` placement; adapters start at the whitened top-``r`` SVD
            of ``W - U V``, with ``W`` from ``teacher``; see :func:`air_ft.lora.residual_init`).
        stats: calibration statistics (:func:`air_ft.compress.get_stats`) for ``residual``; default: the disk
            cache or a calibration pass over ``texts`` with the compression defaults.
        eval_texts: held-out texts for the periodic evaluation loss.
        output_dir: where checkpoints and the loss log go (default: a temporary directory, removed afterwards).
        teacher: the dense model, for distillation (``distill=0.5`` mixes CE and KL to its next-token distribution
            half and half); it stays frozen.
        train_options: any other :class:`TrainConfig` field (``grad_accum``, ``warmup_ratio``, ``eval_steps``...).
        return_summary: return ``(model, summary)``. Without it the summary is pinned on the model as
            ``model.air_ft_train`` (a dict), which is deprecated: a later version returns the pair always.

    Returns:
        ``(model, summary)`` with ``return_summary``: the merged model (plain transformers model with
        LowRankLinear layers; rank ``k`` for ``factors``, ``k + r`` for ``layer`` with ``merge="exact"``), in
        eval mode, and a :class:`FinetuneSummary`. Without it, the model alone.
    """
    cfg = TrainConfig(max_steps=max_steps, learning_rate=learning_rate, seq_len=seq_len, batch_size=batch_size,
                      seed=seed, **{"save_steps": 0, "eval_steps": 25 if eval_texts else 0, **train_options})
    lcfg = LoraConfig(placement=placement, rank=lora_rank, alpha=lora_alpha if lora_alpha else 2.0 * lora_rank,
                      dropout=lora_dropout, merge=merge, init=lora_init)
    if (cfg.distill > 0 or lcfg.init == "residual") and teacher is None:  # refused before the model is wrapped
        raise RecipeError(f"distill={cfg.distill}, lora_init={lcfg.init!r} need the dense model: "
                          "finetune(..., teacher=dense_model)")
    text_weights = check_text_weights(text_weights, len(texts))  # refused before any work
    prepare_model(model)
    with tempfile.TemporaryDirectory(prefix="air_ft_train_") as tmp:
        run = train_adapters(model, tok, texts, eval_texts, cfg, lcfg, Path(output_dir or tmp), weights=text_weights,
                             teacher=teacher, init_texts=texts, stats=stats)
    merged = merge_lora(run.peft_model)
    merged.eval()
    summary = FinetuneSummary(budget=run.budget, train_loss=run.result.training_loss, log=run.log,
                              init=run.init_report, tokens=cfg.max_steps * cfg.step_tokens())
    if return_summary:
        return merged, summary
    warnings.warn("finetune() will return (model, summary): pass return_summary=True; model.air_ft_train is "
                  "deprecated", FutureWarning, stacklevel=2)
    merged.air_ft_train = dataclasses.asdict(summary)
    return merged


def fsdp_adapter_state(fsdp_model, peft_model, offload: bool = False) -> dict[str, torch.Tensor]:
    """The adapters of ``peft_model`` (wrapped inside ``fsdp_model``), gathered whole, under PEFT's saved names.

    PEFT's own selection matches keys against module names, which FSDP has changed (``_fsdp_wrapped_module.``), so
    it selects nothing: ``Trainer.save_model`` then writes an adapter file with no tensors in it (seen on an H100
    with ``accelerate_configs/fsdp.yaml``). Here the parameters are gathered with ``summon_full_params`` and named
    as PEFT names them on disk (wrapper segments and the adapter name dropped). ``offload`` gathers to rank 0's CPU.
    """
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    with FSDP.summon_full_params(fsdp_model, writeback=False, rank0_only=offload, offload_to_cpu=offload):
        return {n.replace("_fsdp_wrapped_module.", "").replace("_checkpoint_wrapped_module.", "")
                 .replace(".default.", "."): p.detach().cpu().clone()
                for n, p in peft_model.named_parameters() if "lora_" in n and ".default." in n}


def save_adapters(trainer, peft_model, adapter_dir: Path) -> None:
    """Write the trained adapters (PEFT format) to ``adapter_dir``; every rank must call it.

    DeepSpeed (ZeRO-3 gathers the 16-bit weights) and plain runs go through ``Trainer.save_model``; FSDP through
    :func:`fsdp_adapter_state`.
    """
    if not getattr(trainer, "is_fsdp_enabled", False):
        trainer.save_model(str(adapter_dir))
        if trainer.accelerator.is_main_process:  # the Trainer pickles its arguments beside the model: JSON instead
            (adapter_dir / "training_args.bin").unlink(missing_ok=True)
            (adapter_dir / "training_args.json").write_text(trainer.args.to_json_string())
        return
    from safetensors.torch import save_file

    several = trainer.accelerator.num_processes > 1  # one process runs NO_SHARD, which cannot offload while gathering
    state = fsdp_adapter_state(trainer.model_wrapped, peft_model, offload=several)
    if trainer.accelerator.is_main_process:
        adapter_dir.mkdir(parents=True, exist_ok=True)
        save_file(state, str(adapter_dir / "adapter_model.safetensors"), metadata={"format": "pt"})
        peft_model.peft_config["default"].save_pretrained(str(adapter_dir))
        if trainer.processing_class is not None:
            trainer.processing_class.save_pretrained(str(adapter_dir))
    trainer.accelerator.wait_for_everyone()


def read_adapter(adapter_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    path = adapter_dir / "adapter_model.safetensors"
    if not path.exists():
        raise AssetError(f"{adapter_dir} has no adapter_model.safetensors; is it an `air-ft train` adapter?")
    state = load_file(str(path))
    empty = [k for k, v in state.items() if v.numel() == 0]
    if not state or empty:
        raise CheckpointError(f"adapter file {path} holds empty tensors ({empty[:3]}): under DeepSpeed ZeRO-3 set "
                           "zero3_save_16bit_model: true (accelerate_configs/deepspeed_zero3.yaml)")
    return state
