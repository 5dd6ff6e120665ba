"""Factored checkpoints: safetensors weights + JSON (config, ranks map, run metadata) + tokenizer.

A checkpoint directory holds ``config.json`` (the base architecture, with ``air_ft`` ranks), ``model.safetensors``
(or shards), ``air_ft.json`` (format marker and what was done), and the tokenizer files. It is written into a
temporary sibling and renamed into place only when complete, so a crash never leaves a directory that
:func:`load_compressed` accepts. No pickle anywhere; no ``trust_remote_code``.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path

import torch
from torch import nn

from air_ft.errors import AssetError, CheckpointError, RecipeError
from air_ft.files import atomic_dir, write_json
from air_ft.modeling import LowRankLinear, factored_skeleton, prepare_model, set_module

__all__ = ["save_compressed", "load_compressed", "export_dense", "record_factoring", "MARKER"]

MARKER = "air_ft.json"
FORMAT_VERSION = 1


def ranks_of(model: nn.Module) -> dict[str, int]:
    """Module name -> rank of every :class:`LowRankLinear` in ``model``."""
    return {name: mod.rank for name, mod in model.named_modules() if isinstance(mod, LowRankLinear)}


def record_factoring(model: nn.Module, method: str | None = None, retention: float | None = None) -> dict:
    """Write ``model.config.air_ft`` (method, retention, ranks of every factored layer), the one place it is
    written: ``config.json`` then carries it, and a loader (air_ft's, or the vLLM plugin) rebuilds the shapes
    from it. ``None`` keeps what an earlier call recorded."""
    old = getattr(model.config, "air_ft", None) or {}
    model.config.air_ft = {"method": method if method is not None else old.get("method"),
                           "retention": retention if retention is not None else old.get("retention"),
                           "ranks": ranks_of(model)}
    return model.config.air_ft


def save_compressed(model: nn.Module, tok, out_dir: str | os.PathLike, metadata: dict | None = None) -> Path:
    """Write a factored model so that :func:`load_compressed` rebuilds it exactly.

    Args:
        model: a model with :class:`LowRankLinear` layers (from :func:`air_ft.compress`).
        tok: its tokenizer (saved alongside), or None.
        out_dir: target directory (replaced atomically if it exists).
        metadata: extra JSON-serializable run information stored in ``air_ft.json``.
    """
    prepare_model(model)
    ranks = ranks_of(model)
    if not ranks:
        raise RecipeError("model has no factored layers; run air_ft.compress first or use save_pretrained")
    with atomic_dir(out_dir) as tmp:
        record_factoring(model)
        model.save_pretrained(tmp, safe_serialization=True)
        if tok is not None:
            tok.save_pretrained(tmp)
        write_json(tmp / MARKER, {"format": "air_ft-factored", "version": FORMAT_VERSION, "ranks": ranks,
                                  "dtype": str(next(model.parameters()).dtype).replace("torch.", ""),
                                  "metadata": metadata or {}})
    return Path(out_dir)


def _load_safetensors_dir(path: Path, device: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise AssetError(f"no .safetensors weights in {path}")
    state = {}
    for f in files:
        state.update(load_file(str(f), device=device))
    return state


@contextlib.contextmanager
def _without_zero3_init():
    """Build modules whole even while a DeepSpeed ZeRO-3 run is alive in this process.

    transformers wraps ``from_config`` in ``deepspeed.zero.Init`` whenever a ZeRO-3 ``TrainingArguments`` exists,
    which partitions parameters as they are created and fails on the meta device ("Cannot copy out of meta
    tensor"). Loading a checkpoint from files (the merge at the end of ``air-ft train``, on the main process) wants
    the whole model, so the flag is lifted for the build and restored after.
    """
    try:
        from transformers.integrations import deepspeed as hf_ds
    except ImportError:  # pragma: no cover - transformers without the integration
        yield
        return
    ref = getattr(hf_ds, "_hf_deepspeed_config_weak_ref", None)
    active = ref() if ref is not None else None
    if active is None or not hf_ds.is_deepspeed_zero3_enabled():
        yield
        return
    hf_ds.unset_hf_deepspeed_config()
    try:
        yield
    finally:
        hf_ds.set_hf_deepspeed_config(active)


def load_compressed(path: str | os.PathLike, dtype: torch.dtype | str | None = None, device: str = "cpu"):
    """Rebuild a factored model and its tokenizer from :func:`save_compressed` output (or a hub repo holding one).

    Returns:
        ``(model, tokenizer)`` in eval mode; the tokenizer is None if none was saved.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from air_ft.modeling import resolve_dtype

    local = Path(path)
    if not local.is_dir():
        if os.path.sep in str(path) or str(path).startswith("."):
            raise AssetError(f"checkpoint directory {str(path)!r} does not exist")
        from huggingface_hub import snapshot_download

        local = Path(snapshot_download(str(path)))
    marker = local / MARKER
    if not marker.exists():
        raise AssetError(f"{local} is not an air_ft factored checkpoint (no {MARKER}); for a dense model "
                                "use transformers' from_pretrained")
    meta = json.loads(marker.read_text())
    config = AutoConfig.from_pretrained(local)
    torch_dtype = resolve_dtype(dtype or meta.get("dtype", "float32"))
    from accelerate import init_empty_weights

    # parameters on the meta device (assigned from the files below), buffers built for real: non-persistent ones
    # (rotary inv_freq, Gemma-3's embedding scale) are not in the checkpoint by design
    with _without_zero3_init(), init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=torch_dtype)
    factored_skeleton(model, meta["ranks"], torch_dtype, "meta")
    state = _load_safetensors_dir(local, device)
    state = {k: v.to(torch_dtype) if v.is_floating_point() else v for k, v in state.items()}
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    tied = set()
    if getattr(config, "tie_word_embeddings", False):
        tied = {k for k in missing if k.endswith("lm_head.weight")}
    if unexpected or set(missing) - tied:
        raise CheckpointError(f"checkpoint {local} does not match its config: missing "
                              f"{sorted(set(missing) - tied)[:5]}, unexpected {sorted(unexpected)[:5]}")
    if tied:
        model.tie_weights()
    model = model.to(device)
    model.eval()
    tok = AutoTokenizer.from_pretrained(local) if (local / "tokenizer_config.json").exists() else None
    return model, tok


def export_dense(model: nn.Module, tok, out_dir: str | os.PathLike) -> Path:
    """Write a plain Hugging Face checkpoint with every ``U V`` multiplied back (for tools that read only dense).

    The model passed in is not modified.
    """
    import copy

    dense = copy.deepcopy(prepare_model(model))
    for name, mod in list(dense.named_modules()):
        if isinstance(mod, LowRankLinear):
            lin = nn.Linear(mod.in_features, mod.out_features, bias=mod.factor_u.bias is not None,
                            dtype=mod.factor_u.weight.dtype, device=mod.factor_u.weight.device)
            with torch.no_grad():
                lin.weight.copy_(mod.weight_product)
                if mod.factor_u.bias is not None:
                    lin.bias.copy_(mod.factor_u.bias)
            set_module(dense, name, lin)
    if hasattr(dense.config, "air_ft"):
        del dense.config.air_ft
    with atomic_dir(out_dir) as tmp:
        dense.save_pretrained(tmp, safe_serialization=True)
        if tok is not None:
            tok.save_pretrained(tmp)
    return Path(out_dir)
