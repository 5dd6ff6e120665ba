"""PEFT LoRA on factored models: where the adapters go, the merge math, and parameter accounting.

Two placements on a :class:`~air_ft.modeling.LowRankLinear` ``y = U (V x) + b`` (``U: m x k``, ``V: k x n``):

* ``factors``: ordinary PEFT LoRA on the two ``nn.Linear`` children, ``U + B_u A_u`` and ``V + B_v A_v``.
  Merging (PEFT's own ``merge_and_unload``) adds each product into its factor, so the rank stays ``k``.
* ``layer``: one LoRA on the whole factored map, ``y = U V x + s B A x + b`` with ``B: m x r``, ``A: r x n`` and
  ``s = alpha / r``. The exact merge concatenates factors, ``U' = [U | s B]``, ``V' = [V ; A]`` (rank ``k + r``);
  ``truncate`` re-factors ``U' V'`` to rank ``k`` by SVD, which is *not* exact (it drops the smallest ``r``
  singular values of ``U V + s B A``).

Linear layers the compression engine left dense get ordinary LoRA in both placements. The LoRA parameters count
against the size budget: :func:`lora_budget` reports retention without and with the adapters.

Adapters start at zero (PEFT's default: ``B = 0``), or, for the ``layer`` placement, at the compression residual
(:func:`residual_init`): ``s B A`` = the best rank-``r`` approximation of ``W - U V`` in the whitened norm
``||(W - U V - s B A) S||_F`` (``S S^T`` = the calibration Gram), i.e. the error the truncation threw away, projected
on the activations' principal directions (the idea of EoRA, Liu et al. 2024). Training then starts from the
rank-``(k + r)`` model that the adapter's parameters can best express instead of from the rank-``k`` one.
"""

from __future__ import annotations

import contextlib
import re

import torch
from peft.tuners.lora import Linear as PeftLoraLinear
from torch import nn

from air_ft.errors import CheckpointError, RecipeError
from air_ft.modeling import LowRankLinear

__all__ = ["PLACEMENTS", "MERGES", "LowRankLoraLinear", "residual_init", "adapter_targets", "apply_lora",
           "merge_lora", "concat_factors", "truncate_factors", "lora_budget", "gathered"]

PLACEMENTS = ("factors", "layer")
MERGES = ("exact", "truncate")


def concat_factors(u: torch.Tensor, v: torch.Tensor, b: torch.Tensor, a: torch.Tensor,
                   scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact merge of a layer-level LoRA into its factors.

    ``U V + s B A = [U | s B] [V ; A]`` for ``U: m x k``, ``V: k x n``, ``B: m x r``, ``A: r x n``.

    Returns:
        ``(U', V')`` of shapes ``m x (k + r)`` and ``(k + r) x n``.
    """
    return torch.cat([u, scale * b.to(u.dtype)], dim=1), torch.cat([v, a.to(v.dtype)], dim=0)


def truncate_factors(u: torch.Tensor, v: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Best rank-``k`` approximation (Frobenius) of ``U V`` without forming the ``m x n`` product.

    With ``U = Q_u R_u`` and ``V^T = Q_v R_v`` (thin QR), ``U V = Q_u (R_u R_v^T) Q_v^T``; the SVD of the small
    ``R_u R_v^T = P S Z^T`` gives ``U V ~ (Q_u P_k S_k^{1/2}) (S_k^{1/2} Z_k^T Q_v^T)``. Computed in float64.
    """
    dtype = u.dtype
    qu, ru = torch.linalg.qr(u.double())
    qv, rv = torch.linalg.qr(v.double().T)
    p, s, zh = torch.linalg.svd(ru @ rv.T)
    root = s[:k].sqrt()
    return (qu @ (p[:, :k] * root)).to(dtype), ((root[:, None] * zh[:k]) @ qv.T).to(dtype)


class LowRankLoraLinear(PeftLoraLinear):
    """PEFT LoRA layer around a whole :class:`LowRankLinear` (the ``layer`` placement).

    The forward pass is PEFT's: ``base(x) + s B(A(dropout(x)))``. Merging swaps the base's factors for the
    concatenated ``[U | s B]``, ``[V ; A]`` (or their rank-``k`` truncation when ``merge_mode == "truncate"``).
    """

    merge_mode: str = "exact"

    def _get_in_out_features(self, module: nn.Module) -> tuple[int, int]:
        return module.in_features, module.out_features

    def _get_base_layer_device_and_dtype(self, base_layer: nn.Module):
        w = base_layer.factor_u.weight
        return w.device, w.dtype

    def get_delta_weight(self, adapter: str) -> torch.Tensor:
        return (self.lora_B[adapter].weight @ self.lora_A[adapter].weight) * self.scaling[adapter]

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        base: LowRankLinear = self.get_base_layer()
        for name in adapter_names or self.active_adapters:
            if name not in self.lora_A:
                continue
            u, v = base.factor_u.weight.data, base.factor_v.weight.data
            k = base.rank
            u2, v2 = concat_factors(u, v, self.lora_B[name].weight.data, self.lora_A[name].weight.data,
                                    self.scaling[name])
            if self.merge_mode == "truncate":
                u2, v2 = truncate_factors(u2, v2, k)
            if safe_merge and not (torch.isfinite(u2).all() and torch.isfinite(v2).all()):
                raise CheckpointError(f"NaNs or Infs while merging adapter {name!r}; the adapter is broken")
            _set_factors(base, u2, v2)
            self.merged_adapters.append(name)

    def unmerge(self) -> None:
        raise NotImplementedError("a layer-level LoRA merged into LowRankLinear changes its rank and cannot be "
                                  "unmerged; merge a copy instead")


def _set_factors(layer: LowRankLinear, u: torch.Tensor, v: torch.Tensor) -> None:
    """Replace ``layer``'s children by ``nn.Linear`` holding ``U: m x k'`` and ``V: k' x n`` (bias kept)."""
    bias = layer.factor_u.bias
    new_u = nn.Linear(u.shape[1], u.shape[0], bias=bias is not None, dtype=u.dtype, device=u.device)
    new_v = nn.Linear(v.shape[1], v.shape[0], bias=False, dtype=v.dtype, device=v.device)
    with torch.no_grad():
        new_u.weight.copy_(u)
        new_v.weight.copy_(v)
        if bias is not None:
            new_u.bias.copy_(bias)
    layer.factor_u, layer.factor_v, layer.rank = new_u, new_v, u.shape[1]


def adapter_targets(model: nn.Module, placement: str, dense: list[str] | None = None) -> list[str]:
    """Full module names that get a LoRA adapter.

    Args:
        model: a factored model (plain transformers model, not yet PEFT-wrapped).
        placement: ``factors`` (the ``factor_u``/``factor_v`` children) or ``layer`` (each LowRankLinear).
        dense: regexes (``re.search``) selecting plain ``nn.Linear`` layers outside the factored ones. Empty or
            None: every such layer except the LM head (those the engine left dense).
    """
    if placement not in PLACEMENTS:
        raise RecipeError(f"placement {placement!r} is unknown; choose one of {PLACEMENTS}")
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    factored = {n: m for n, m in model.named_modules() if isinstance(m, LowRankLinear)}
    if not factored:
        raise RecipeError("model has no LowRankLinear layers; compress it first (air_ft.compress)")
    names = []
    for name in factored:
        names += [f"{name}.factor_u", f"{name}.factor_v"] if placement == "factors" else [name]
    inside = tuple(f"{n}." for n in factored)
    for name, mod in model.named_modules():
        if type(mod) is not nn.Linear or mod is head or name.startswith(inside):
            continue
        if not dense or any(re.search(p, name) for p in dense):
            names.append(name)
    return names


def apply_lora(model: nn.Module, placement: str = "factors", rank: int = 8, alpha: float = 16.0,
               dropout: float = 0.0, dense: list[str] | None = None, merge: str = "exact",
               autocast_adapter_dtype: bool = True):
    """Wrap ``model`` in a PEFT ``PeftModel`` with LoRA on the factored (and left-dense) layers.

    Base parameters are frozen; only ``lora_A``/``lora_B`` train. ``autocast_adapter_dtype=False`` keeps adapters
    in the base dtype (needed under DeepSpeed ZeRO-3 with bf16, which requires one dtype for all parameters).
    """
    from peft import LoraConfig, get_peft_model

    if merge not in MERGES:
        raise RecipeError(f"merge {merge!r} is unknown; choose one of {MERGES}")
    targets = adapter_targets(model, placement, dense)
    # exact full-name match: the list form of target_modules also matches suffixes
    pattern = "^(" + "|".join(re.escape(t) for t in targets) + ")$"
    config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=pattern, bias="none",
                        task_type="CAUSAL_LM")
    config._register_custom_module({LowRankLinear: LowRankLoraLinear})
    peft_model = get_peft_model(model, config, autocast_adapter_dtype=autocast_adapter_dtype)
    for mod in peft_model.modules():
        if isinstance(mod, LowRankLoraLinear):
            mod.merge_mode = merge
    return peft_model


@torch.no_grad()
def residual_init(peft_model, dense: nn.Module, grams: dict[str, torch.Tensor], eps: float = 0.0) -> dict:
    """Start every layer-placement adapter at the whitened top-``r`` SVD of its compression residual ``W - U V``.

    With ``S S^T = G`` (the layer's calibration Gram, :func:`air_ft.linalg.whitening_factor`) and
    ``(W - U V) S = P diag(lambda) Q^T``, sets ``s B A = P_r diag(lambda_r) Q_r^T S^{-1}`` with the scale split
    evenly, ``B = P_r lambda_r^{1/2} / s^{1/2}`` and ``A = lambda_r^{1/2} Q_r^T S^{-1} / s^{1/2}``. If the base
    ``U V`` is SVD-LLM(W) at rank ``k``, base + adapter is exactly SVD-LLM(W) at rank ``k + r``.

    Args:
        peft_model: from :func:`apply_lora` with ``placement="layer"``.
        dense: the uncompressed model the factored one came from (same module names).
        grams: layer name (in ``dense``) -> ``n x n`` Gram of its input.
        eps: damping for the whitening factor, as in compression.

    Returns:
        layer name -> relative whitened residual before and after, ``||E S|| / ||W S||``.
    """
    from air_ft import linalg

    weights = {n: m.weight for n, m in dense.named_modules() if isinstance(m, nn.Linear)}
    layers = {n: m for n, m in peft_model.named_modules() if isinstance(m, LowRankLoraLinear)}
    if not layers:
        raise RecipeError("residual initialization needs the 'layer' placement (one adapter per factored layer)")
    report, roots = {}, {}  # whitening factors by Gram: q/k/v (and gate/up) share one input
    for full, mod in layers.items():
        name = full.removeprefix("base_model.model.")  # PEFT's wrapper prefix
        if name not in weights or name not in grams:
            raise RecipeError(f"no dense weight or calibration Gram for {full}: pass the model it was compressed from")
        gram = grams[name]
        if id(gram) not in roots:
            roots[id(gram)] = linalg.whitening_factor(gram, eps)[0]
        base: LowRankLinear = mod.get_base_layer()
        for adapter in mod.active_adapters:
            a_mod, b_mod, scale = mod.lora_A[adapter], mod.lora_B[adapter], mod.scaling[adapter]
            with gathered([base.factor_u.weight, base.factor_v.weight, a_mod.weight, b_mod.weight]):
                w = weights[name].detach().to(torch.float64)
                s = roots[id(gram)].to(w.device)
                resid = w - base.factor_u.weight.double() @ base.factor_v.weight.double()
                es = resid @ s
                p, lam, qh = linalg.truncated_svd(es, min(a_mod.weight.shape[0], *es.shape))
                bf, af = linalg.back_project(p, lam, qh, s)
                c = bf.shape[1]  # < r only if r exceeds the matrix rank: the rest of the adapter stays zero
                b_mod.weight.zero_()[:, :c] = bf * scale**-0.5
                a_mod.weight.zero_()[:c] = af * scale**-0.5
                after = (resid - scale * b_mod.weight.double() @ a_mod.weight.double()) @ s
                norm = float((w @ s).norm())
                report[name] = (float(es.norm()) / norm, float(after.norm()) / norm)
    return report


@contextlib.contextmanager
def gathered(params: list[nn.Parameter]):
    """Gather DeepSpeed ZeRO-3 partitioned parameters for reading/writing (a no-op otherwise).

    Under ZeRO-3 each rank holds a shard and ``param.data`` is empty: merging without gathering silently merges
    empty tensors.
    """
    if any(hasattr(p, "ds_id") for p in params):
        import deepspeed

        with deepspeed.zero.GatheredParameters(params, modifier_rank=0):
            yield
    else:
        yield


def merge_lora(peft_model) -> nn.Module:
    """Merge every adapter into its base and return the plain (unwrapped) factored model.

    ``factors`` and dense adapters go through PEFT's ``merge_and_unload`` (``W + s B A``); layer-level adapters
    through :meth:`LowRankLoraLinear.merge` (rank ``k + r``, or ``k`` when truncating).
    """
    with gathered(list(peft_model.parameters())):
        return peft_model.merge_and_unload(safe_merge=True)


def lora_budget(model: nn.Module) -> dict:
    """Parameter accounting of a (possibly PEFT-wrapped) factored model.

    ``retention`` = factored parameters / dense parameters of the factored layers (what the engine reports);
    ``retention_with_adapters`` adds every trainable adapter parameter to the numerator, which is the fair count
    when comparing against a model of equal size that has no adapters.
    """
    dense = factored = 0
    for mod in model.modules():
        if isinstance(mod, LowRankLinear):
            dense += mod.in_features * mod.out_features + (mod.out_features if mod.factor_u.bias is not None else 0)
            factored += sum(p.numel() for n, p in mod.named_parameters() if "lora_" not in n)
    adapters = sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    return {"trainable_params": trainable, "adapter_params": adapters, "total_params": total,
            "factored_layer_params": factored, "dense_layer_params": dense,
            "retention": factored / dense if dense else None,
            "retention_with_adapters": (factored + adapters) / dense if dense else None}
