"""One calibration pass: input Gram matrices (forward hooks) and per-sample influence maps (backward hooks).

Per layer input, ``G = sum_t x_t x_t^T`` is accumulated in float64; layers that read the same tensor (q/k/v,
gate/up) share one Gram. When influence is requested, each batch also runs a backward pass of the summed
per-sample next-token loss. No parameter gradient is materialized by autograd: a hook on every target layer's
output receives ``dL/dy`` and forms the per-sample weight gradients ``g_d = dY_d^T X_d`` itself (the same flops
as the weight gradient of a normal backward), from which it accumulates

- ``wxg``:    ``sum_d |W * g_d|`` (absolute value per sample, docs/method.md section 3),
- ``fisher``: ``sum_d g_d^2`` (element-wise empirical Fisher),
- ``ograd``:  ``sum_t dy_t dy_t^T`` (float64, ``m x m``), the Gram of the layer's output gradient over every token:
  the output-side weighting of the two-sided whitening (docs/method.md section 6).

A second, optional pass measures the Fisher in the whitened coordinates the ALS works in (``W' = W S``): the
gradient with respect to ``W'`` is ``g_d S^-T``, i.e. the weight gradient of whitened inputs ``x S^-T``, so the
hook whitens each input once and forms the same per-sample products (``fisher_whitened``; it needs the Grams, hence
the second pass). Either backward pass also accumulates ``ograd``: it needs no whitening.

Nothing per token is stored. Statistics are cached on disk, keyed by model, data and settings.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from air_ft.errors import CalibrationError
from air_ft.files import atomic_file, write_text

__all__ = ["CalibrationStats", "CalibrationError", "calibrate", "model_fingerprint", "stats_key", "load_stats",
           "save_stats"]

SIGNALS = ("wxg", "fisher", "ograd")
WHITENED = "fisher_whitened"
OGRAD = "ograd"
CACHE_VERSION = 2  # 2: every backward pass also holds the output-gradient Gram


@dataclass
class CalibrationStats:
    """What compression needs from the data.

    Attributes:
        grams: float64 ``n x n`` Gram per distinct input, keyed by the first layer that reads it.
        abs_sum: float64 ``n``, ``sum_t |x_t|`` per distinct input (ASVD's scaling).
        group_of: target layer name -> key into ``grams``.
        tokens: number of calibration tokens.
        influence: signal (``wxg``/``fisher``/``fisher_whitened``) -> layer name -> float32 ``m x n`` map, and
            ``ograd`` -> layer name -> float64 ``m x m`` output-gradient Gram (empty if no backward ran).
        seconds: wall time of the forward and backward work.
    """

    grams: dict[str, torch.Tensor]
    abs_sum: dict[str, torch.Tensor]
    group_of: dict[str, str]
    tokens: int
    influence: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)
    seconds: float = 0.0
    cached: bool = False

    def gram(self, name: str) -> torch.Tensor:
        return self.grams[self.group_of[name]]


def _check_finite(t: torch.Tensor, what: str, name: str) -> None:
    if not torch.isfinite(t).all():
        raise CalibrationError(
            f"{what} of layer {name!r} contains NaN or Inf during calibration. The model overflows in its current "
            "dtype on this data: load it in float32 (dtype=float32), check the calibration text for garbage, "
            "or exclude the layer (exclude regex).")


class StatsHooks:
    """Forward/backward hooks that accumulate Grams and influence for a set of target linears."""

    def __init__(self, targets: dict[str, nn.Linear], influence: bool,
                 unwhiten: dict[str, torch.Tensor] | None = None, grams: bool = True, maps: bool = True) -> None:
        if unwhiten is not None and not maps:
            raise ValueError("a whitened pass measures element-wise maps: maps=False takes no whitening")
        self.targets = targets
        self.influence = influence
        self.unwhiten = unwhiten  # layer -> S^-T: measure the Fisher in whitened coordinates only
        self.maps = maps  # False: the output-gradient Grams alone (no m x n map per layer)
        self.want_grams = grams and unwhiten is None  # the whitened pass already has its Grams
        self.in_backward = False  # forwards run by activation checkpointing's recomputation are not new data
        self.group_of: dict[str, str] = {}
        self.grams: dict[str, torch.Tensor] = {}
        self.abs_sum: dict[str, torch.Tensor] = {}
        signals = (WHITENED, OGRAD) if unwhiten is not None else SIGNALS if maps else (OGRAD,)
        self.imaps: dict[str, dict[str, torch.Tensor]] = {s: {} for s in signals} if self.influence else {}
        self._seen: dict[int, tuple[str, torch.Tensor]] = {}  # id(input) -> (leader, input) during the first batch
        self._whitened: dict[str, torch.Tensor] = {}  # group leader -> x S^-T for the current batch
        self.handles: list = []
        self.first_batch = True

    def attach(self) -> None:
        for name, mod in self.targets.items():
            self.handles.append(mod.register_forward_hook(self._forward_hook(name)))

    def detach(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles.clear()
        self._seen.clear()

    def end_batch(self) -> None:
        self.first_batch = False
        self.in_backward = False
        self._seen.clear()
        self._whitened.clear()

    def _forward_hook(self, name: str):
        def hook(mod: nn.Linear, inputs: tuple, output: torch.Tensor) -> None:
            if self.in_backward:
                return
            if self.first_batch:  # group layers that read the very same tensor (kept alive to make ids unique)
                leader, _ = self._seen.setdefault(id(inputs[0]), (name, inputs[0]))
                self.group_of[name] = leader
            x = inputs[0].detach()
            if self.group_of[name] == name and self.want_grams:
                flat = x.reshape(-1, x.shape[-1]).to(torch.float64)
                if name not in self.grams:
                    self.grams[name] = torch.zeros(flat.shape[1], flat.shape[1], dtype=torch.float64,
                                                   device=flat.device)
                    self.abs_sum[name] = torch.zeros(flat.shape[1], dtype=torch.float64, device=flat.device)
                self.grams[name].addmm_(flat.T, flat)
                # a NaN or Inf anywhere in x reaches the diagonal (sums of squares): checking it is checking x
                _check_finite(self.grams[name].diagonal(), "the input", name)
                self.abs_sum[name] += flat.abs().sum(0)
            elif self.group_of[name] == name:  # no Gram of this input here: check it directly
                _check_finite(x, "the input", name)
            if self.influence and output.requires_grad:
                if not self.maps:
                    output.register_hook(self._ograd_hook(name))
                elif self.unwhiten is not None:
                    leader = self.group_of[name]
                    if leader not in self._whitened:  # whiten once per input, shared by q/k/v and gate/up
                        self._whitened[leader] = x.to(torch.float32) @ self.unwhiten[name]
                    output.register_hook(self._whitened_grad_hook(name, self._whitened[leader]))
                else:
                    output.register_hook(self._grad_hook(name, mod, x))

        return hook

    def _accumulate(self, sig: str, name: str, val: torch.Tensor) -> None:
        acc = self.imaps[sig]
        if name in acc:
            acc[name] += val
        else:
            acc[name] = val

    def _output_gram(self, name: str, grad_out: torch.Tensor) -> None:
        """Accumulate the Gram of this batch's output gradient (every gradient hook calls it first, and a NaN or Inf
        anywhere in the gradient reaches its diagonal: the one check of the gradient)."""
        flat = grad_out.reshape(-1, grad_out.shape[-1]).to(torch.float64)
        gram = flat.T @ flat
        _check_finite(gram.diagonal(), "the output gradient", name)
        self._accumulate(OGRAD, name, gram)

    def _ograd_hook(self, name: str):
        def hook(grad_out: torch.Tensor) -> None:
            self._output_gram(name, grad_out)

        return hook

    def _whitened_grad_hook(self, name: str, xw: torch.Tensor):
        def hook(grad_out: torch.Tensor) -> None:
            self._output_gram(name, grad_out)
            g = grad_out.to(torch.float32).reshape(grad_out.shape[0], -1, grad_out.shape[-1])
            xs = xw.reshape(xw.shape[0], -1, xw.shape[-1])
            self._accumulate(WHITENED, name, torch.bmm(g.transpose(1, 2), xs).square_().sum(0))

        return hook

    def _grad_hook(self, name: str, mod: nn.Linear, x: torch.Tensor):
        def hook(grad_out: torch.Tensor) -> None:
            self._output_gram(name, grad_out)
            g = grad_out.to(torch.float32).reshape(grad_out.shape[0], -1, grad_out.shape[-1])
            xs = x.to(torch.float32).reshape(x.shape[0], -1, x.shape[-1])
            per_sample = torch.bmm(g.transpose(1, 2), xs)  # (B, m, n): dL_d/dW for each sample d
            w = mod.weight.detach().to(torch.float32)
            self._accumulate("wxg", name, (per_sample * w).abs_().sum(0))
            self._accumulate("fisher", name, per_sample.square_().sum(0))

        return hook


def calibrate(model: nn.Module, windows: torch.Tensor, targets: dict[str, nn.Linear], influence: bool,
              batch_size: int = 4, progress: bool = True,
              whitening: dict[str, torch.Tensor] | None = None, grams: bool = True,
              start: nn.Module | None = None, checkpointing: bool = False, desc: str | None = None,
              tokens: int | None = None, maps: bool = True) -> CalibrationStats:
    """Run the calibration windows through ``model`` once and collect :class:`CalibrationStats`.

    Args:
        model: a causal LM (any device/dtype); its parameters are left untouched, hooks are removed afterwards.
        windows: ``(N, T)`` token ids.
        targets: layers to observe (from :func:`air_ft.modeling.find_targets`).
        influence: also run the backward pass for the ``wxg``/``fisher`` maps and the ``ograd`` Grams.
        batch_size: windows per forward pass.
        whitening: layer -> whitening factor ``S`` (``W' = W S``): instead of ``wxg``/``fisher``, measure
            ``fisher_whitened = sum_d (g_d S^-T)^2``, the Fisher of the whitened weight (a second pass: ``S``
            comes from the Grams of a first one), and ``ograd``.
        grams: accumulate the input Grams (an influence pass over a group of blocks whose Grams are known sets
            False).
        start: the module (a decoder block) at whose input the backward may stop: no layer before it is
            observed, so no graph is built below it (default: the input embeddings).
        checkpointing: recompute block activations in the backward (Hugging Face gradient checkpointing):
            memory of one block's activations instead of all of them, for one more forward.
        tokens: calibration tokens to record (default ``windows.numel()``; a process of several holds a shard).
        maps: with ``influence``, also the element-wise maps; False: the backward accumulates the ``ograd`` Grams
            alone (what global rank allocation reads; much less work per token).
    """
    device = next(model.parameters()).device
    unwhiten = None
    if whitening is not None:
        inverse: dict[int, torch.Tensor] = {}  # S^-T once per distinct factor (layers of one input share S)
        unwhiten = {}
        for name, s in whitening.items():
            if id(s) not in inverse:
                inverse[id(s)] = torch.linalg.inv(s.to(device, torch.float64)).T.to(torch.float32).contiguous()
            unwhiten[name] = inverse[id(s)]
        influence = True
    hooks = StatsHooks(targets, influence, unwhiten, grams=grams, maps=maps)
    saved_flags = {n: p.requires_grad for n, p in model.named_parameters()}
    was_training = model.training
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    handle = None
    if influence and start is None:
        handle = model.get_input_embeddings().register_forward_hook(lambda m, i, o: o.requires_grad_(True))
    elif influence:  # the graph starts at this block's input: nothing below it is differentiated
        def grad_from_here(mod, args, kwargs):
            if args:
                return (args[0].detach().requires_grad_(True), *args[1:]), kwargs
            return args, {**kwargs, "hidden_states": kwargs["hidden_states"].detach().requires_grad_(True)}

        handle = start.register_forward_pre_hook(grad_from_here, with_kwargs=True)
    # transformers 5 renamed gradient_checkpointing_* to activation_checkpointing_* (the old names warn)
    prefix = "activation" if hasattr(model, "activation_checkpointing_enable") else "gradient"
    ckpt = influence and checkpointing and getattr(model, "supports_gradient_checkpointing", False)
    was_ckpt = ckpt and getattr(model, f"is_{prefix}_checkpointing", False)
    if ckpt and not was_ckpt:
        getattr(model, f"{prefix}_checkpointing_enable")({"use_reentrant": False})
        model.eval()
        for mod in model.modules():  # a block recomputes only in training mode: switch the blocks alone, so that
            if getattr(mod, "gradient_checkpointing", False):  # their attention and MLP keep eval behaviour
                mod.training = True
    hooks.attach()
    t0 = time.perf_counter()
    try:
        batches = windows.split(batch_size)
        desc = desc or (("whitened influence" if whitening is not None else "calibration") + (
            " (forward+backward)" if influence else " (forward)"))
        for batch in tqdm(batches, desc=desc, disable=not progress):
            batch = batch.to(device)
            with torch.set_grad_enabled(influence):
                out = model(input_ids=batch, labels=batch if influence else None, use_cache=False)
                if influence:
                    if not torch.isfinite(out.loss):
                        raise CalibrationError("calibration loss is NaN/Inf; load the model in float32 or check "
                                               "the calibration text")
                    hooks.in_backward = True
                    # out.loss is the mean over equal-length samples; scale so each sample's loss has weight 1
                    (out.loss * batch.shape[0]).backward()
            hooks.end_batch()
    finally:
        hooks.detach()
        if handle is not None:
            handle.remove()
        if ckpt and not was_ckpt:
            getattr(model, f"{prefix}_checkpointing_disable")()
        for n, p in model.named_parameters():
            p.requires_grad_(saved_flags[n])
        model.train(was_training)
    return CalibrationStats(grams=hooks.grams, abs_sum=hooks.abs_sum, group_of=dict(hooks.group_of),
                            tokens=int(windows.numel() if tokens is None else tokens), influence=hooks.imaps,
                            seconds=time.perf_counter() - t0)


def model_fingerprint(model: nn.Module) -> str:
    """Content hash of the config and every parameter's bytes (exact and independent of thread count)."""
    h = hashlib.blake2b(digest_size=20)
    cfg = getattr(model, "config", None)
    if cfg is not None:
        h.update(json.dumps(cfg.to_diff_dict(), sort_keys=True, default=str).encode())
    with torch.no_grad():
        for name, p in model.named_parameters():
            h.update(f"{name}:{tuple(p.shape)}:{p.dtype}".encode())
            h.update(p.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def stats_key(fingerprint: str, windows: torch.Tensor, targets: list[str], influence: bool | str) -> str:
    """Cache key: model content (:func:`model_fingerprint`), exact calibration tokens, target set, which pass."""
    h = hashlib.sha256()
    h.update(f"v{CACHE_VERSION}".encode())
    h.update(fingerprint.encode())
    h.update(windows.cpu().numpy().tobytes())
    h.update(json.dumps(sorted(targets)).encode())
    h.update(str(influence).encode())
    return h.hexdigest()[:24]


def stats_dir() -> Path:
    """Where calibration statistics are cached (``AIR_FT_CACHE/stats``)."""
    from air_ft.assets import cache_root

    return cache_root() / "stats"


def save_stats(stats: CalibrationStats, path: Path) -> None:
    """Write stats as safetensors + JSON, atomically (a crash leaves no file that :func:`load_stats` accepts)."""
    from safetensors.torch import save_file

    path.mkdir(parents=True, exist_ok=True)
    tensors = {f"gram::{k}": v.contiguous() for k, v in stats.grams.items()}
    tensors.update({f"abs::{k}": v.contiguous() for k, v in stats.abs_sum.items()})
    for sig, maps in stats.influence.items():
        tensors.update({f"{sig}::{k}": v.contiguous() for k, v in maps.items()})
    with atomic_file(path / "stats.safetensors") as tmp:
        save_file({k: v.cpu() for k, v in tensors.items()}, str(tmp))
    meta = {"group_of": stats.group_of, "tokens": stats.tokens, "seconds": stats.seconds,
            "signals": sorted(stats.influence), "version": CACHE_VERSION}
    write_text(path / "stats.json", json.dumps(meta))  # last: it marks the statistics complete


def load_stats(path: Path, device: torch.device | str = "cpu") -> CalibrationStats | None:
    """Read stats written by :func:`save_stats`, or ``None`` if absent or incomplete."""
    from safetensors.torch import load_file

    if not (path / "stats.json").exists() or not (path / "stats.safetensors").exists():
        return None
    meta = json.loads((path / "stats.json").read_text())
    tensors = load_file(str(path / "stats.safetensors"), device=str(device))
    grams, abs_sum, infl = {}, {}, {s: {} for s in meta["signals"]}
    for key, val in tensors.items():
        kind, name = key.split("::", 1)
        if kind == "gram":
            grams[name] = val
        elif kind == "abs":
            abs_sum[name] = val
        else:
            infl[kind][name] = val
    return CalibrationStats(grams=grams, abs_sum=abs_sum, group_of=meta["group_of"], tokens=meta["tokens"],
                            influence=infl, seconds=meta["seconds"], cached=True)
