"""ACIP-style compression (Genzel et al. 2025, "Choose Your Model Size: Any Compression by a Single Gradient
Descent"), re-implemented on this project's data, trainer and checkpoint format as a baseline for AIR.

Every target linear ``W = U Sigma V^T`` (plain float32 SVD, no whitening) becomes a :class:`MaskedLowRankLinear`
``y = U' (g(m) * (B' x)) + b`` with ``U' = U / sqrt(s)`` and ``B' = Sigma V^T / sqrt(s)`` frozen and one mask entry
per singular value, initialized to ``s``. The gate ``g = (relu(m) > 0) s + relu(m) - relu(m).detach()`` is binary
in the forward pass (``s`` or 0, so a full mask reproduces ``W``) and passes the gradient of ``relu`` backwards
(a pruned entry gets none). LoRA on the whole parametrized layer trains jointly with the masks on the LM loss plus
``lambda_t sum relu(m)`` (``lambda_t = lambda_init growth^floor(t / every)``) until the size ratio reaches
``stop_retention``. The order in which entries die gives one global score map; any size is one threshold on it.
Then the masks freeze and LoRA alone trains for ``post_tune_steps``.

As in the reference: no gradient clipping, no step cap but the user's (``max_steps=None`` runs until the stop, up
to the reference's own 50,000), and the post-tune continues the mask phase's optimizer (its AdamW state) with the
masks frozen. The post-tune trains on blocks the mask phase never sees (a seeded split of the block pool).

Deviations from the reference code, on purpose: the size ratio counts the parameters the materialized model
really has, the merged LoRA included (``r (m + n)`` per layer), for the stop rule as for :meth:`AcipFit.materialize`,
so that an ACIP-style row at a retention has exactly the parameters of every other method's row there (the
reference counts the factorized layers only and leaves LoRA out); masks are float32 (in bf16, AdamW at 5e-5 cannot
move 0.02 for hundreds of steps); ties between entries that died at the same step are broken by their last
positive mask value, then by their singular value, so that any target is hit within one entry; the data are the
project's packed blocks, not padded documents.

This module runs past the ~400-line guideline on purpose: it is one algorithm (parametrization, the mask phase's
callback, the score map, the fit, its checkpoint and the materialization), read top to bottom against the
reference implementation; splitting it would separate the parts that must be compared with it together.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
from pathlib import Path

import torch
from torch import nn
from transformers import TrainerCallback

from air_ft.checkpoint import record_factoring
from air_ft.config import TrainConfig
from air_ft.errors import AssetError, CheckpointError, DataError, RecipeError
from air_ft.files import atomic_dir, atomic_file, write_json
from air_ft.modeling import LowRankLinear, find_targets, prepare_model, set_module

__all__ = ["MaskedLowRankLinear", "gate", "parametrize", "acip_fit", "AcipFit", "size_ratio", "update_scores",
           "select_entries"]

FIT_MARKER = "acip_fit.json"
#: the reference implementation's own bound on mask-phase steps, used when ``max_steps`` is None
REFERENCE_STEP_CAP = 50_000


def gate(mask: torch.Tensor, scale: float) -> torch.Tensor:
    """Binary forward (``scale`` where ``mask > 0``, else 0), straight-through ``relu`` gradient backwards."""
    r = torch.relu(mask)
    return (r > 0).to(mask.dtype) * scale + (r - r.detach())  # exactly binary forward: (r - r) == 0


class MaskedLowRankLinear(LowRankLinear):
    """A full-rank SVD parametrization ``U' (g(m) * (B' x)) + b`` with a trainable mask ``m`` per singular value.

    A :class:`LowRankLinear` (``factor_v`` = ``B'``, ``factor_u`` = ``U'``), so PEFT's ``layer`` LoRA wraps it like any
    factored layer; the mask is float32 whatever the weights' dtype.
    """

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool = False, dtype=None, device=None,
                 scale: float = 0.02) -> None:
        super().__init__(in_features, out_features, rank, bias, dtype, device)
        self.scale = scale
        self.mask = nn.Parameter(torch.full((rank,), scale, dtype=torch.float32, device=device))

    #: below this fraction of live entries the forward multiplies by the live rows and columns only
    COMPACT_BELOW = 0.9

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        g = gate(self.mask, self.scale).to(x.dtype)
        live = torch.nonzero(self.mask.detach() > 0).squeeze(1)
        if live.numel() >= self.COMPACT_BELOW * self.rank:
            return self.factor_u(self.factor_v(x) * g)
        # the same map: a dead entry's gate is 0 forwards and passes no gradient backwards; a late mask phase
        # (and every post-tune step) then costs what its live rank costs, not the full rank's
        h = nn.functional.linear(x, self.factor_v.weight[live]) * g[live]
        return nn.functional.linear(h, self.factor_u.weight[:, live], self.factor_u.bias)

    def live(self) -> torch.Tensor:
        return self.mask.detach() > 0


def parametrize(model: nn.Module, scale: float = 0.02, include=None, exclude=None) -> dict[str, torch.Tensor]:
    """Replace every target linear of ``model`` in place by a :class:`MaskedLowRankLinear`; return the singular
    values per layer (float32 SVD of ``W``, ``U' = U / sqrt(s)``, ``B' = Sigma V^T / sqrt(s)``)."""
    targets = find_targets(model, include, exclude)
    if not targets:
        raise RecipeError("no nn.Linear layer to parametrize; ACIP needs torch.nn.Linear projections")
    sigmas = {}
    for name, mod in targets.items():
        w = mod.weight.detach().float()
        u, s, vh = torch.linalg.svd(w, full_matrices=False)
        layer = MaskedLowRankLinear(mod.in_features, mod.out_features, s.numel(), bias=mod.bias is not None,
                                    dtype=mod.weight.dtype, device=mod.weight.device, scale=scale)
        with torch.no_grad():
            layer.factor_u.weight.copy_(u / math.sqrt(scale))
            layer.factor_v.weight.copy_(s[:, None] * vh / math.sqrt(scale))
            if mod.bias is not None:
                layer.factor_u.bias.copy_(mod.bias)
        set_module(model, name, layer)
        sigmas[name] = s.cpu()
    return sigmas


def _unwrapped_name(name: str) -> str:
    """A module's name in the model before PEFT wrapped it (``base_model.model.`` and ``.base_layer`` dropped)."""
    return name.replace("base_model.model.", "", 1).replace(".base_layer", "")


def _masked_layers(model: nn.Module) -> dict[str, MaskedLowRankLinear]:
    """Masked layers by their name in the unwrapped model."""
    return {_unwrapped_name(n): m for n, m in model.named_modules() if isinstance(m, MaskedLowRankLinear)}


def size_ratio(ranks: dict[str, int], shapes: dict[str, tuple[int, int]],
               extra: dict[str, int] | None = None) -> float:
    """``sum min(m n, (r + e) (m + n)) / sum m n``: a layer whose rank saves nothing counts (and stays) dense.
    ``extra`` (``e``) adds a fixed rank per layer: the LoRA that :meth:`AcipFit.materialize` merges in."""
    extra = extra or {}
    total = sum(m * n for m, n in shapes.values())
    return sum(min(m * n, (ranks[k] + extra.get(k, 0)) * (m + n)) for k, (m, n) in shapes.items()) / total


def update_scores(scores: torch.Tensor, mask: torch.Tensor, last_positive: torch.Tensor) -> None:
    """One step of the score map, in place: live entries take their mask value, an entry that just died gets 0,
    then every score <= 0 falls by 1 (so entries pruned earlier end more negative). ``last_positive`` keeps each
    entry's mask value from its last step alive (the tie-break among entries that died together)."""
    live = mask > 0
    just_died = (~live) & (scores > 0)
    scores[live] = mask[live]
    last_positive[live] = mask[live]
    scores[just_died] = 0.0
    scores[scores <= 0] -= 1.0


def select_entries(scores: dict[str, torch.Tensor], last_positive: dict[str, torch.Tensor],
                   sigmas: dict[str, torch.Tensor], shapes: dict[str, tuple[int, int]], retention: float,
                   extra: dict[str, int] | None = None) -> dict[str, torch.Tensor]:
    """The kept entries per layer for a target size: the global order (score, then last positive mask value, then
    sigma, all descending) cut at the shortest prefix whose size ratio reaches ``retention``.

    ``extra`` adds a fixed rank per layer (a merged LoRA) to the size that is counted.
    """
    names = list(scores)
    keys = torch.cat([torch.stack([scores[n].double(), last_positive[n].double(), sigmas[n].double()], 1)
                      for n in names])
    layer_of = torch.cat([torch.full((scores[n].numel(),), i, dtype=torch.long) for i, n in enumerate(names)])
    order = torch.arange(keys.shape[0])
    for col in (2, 1, 0):  # lexicographic descending: stable sorts from the least significant key
        order = order[torch.sort(keys[order, col], descending=True, stable=True).indices]
    extra = extra or {}
    mn = torch.tensor([shapes[n][0] * shapes[n][1] for n in names], dtype=torch.float64)
    mpn = torch.tensor([shapes[n][0] + shapes[n][1] for n in names], dtype=torch.float64)
    base = torch.tensor([extra.get(n, 0) for n in names], dtype=torch.float64)
    # size after each prefix: the j-th entry of layer L in the order raises L's rank to base + j
    layer_seq = layer_of[order]
    rank_after = torch.zeros_like(layer_seq, dtype=torch.float64)
    for i in range(len(names)):
        pos = (layer_seq == i).nonzero().squeeze(1)
        rank_after[pos] = base[i] + torch.arange(1, pos.numel() + 1, dtype=torch.float64)
    gain = torch.minimum(mn[layer_seq], rank_after * mpn[layer_seq]) - torch.minimum(
        mn[layer_seq], (rank_after - 1) * mpn[layer_seq])
    start = torch.minimum(mn, base * mpn).sum()
    sizes = start + torch.cumsum(gain, 0)
    goal = retention * mn.sum()
    reach = (sizes >= goal).nonzero()
    count = int(reach[0]) + 1 if reach.numel() else len(order)
    flat = torch.zeros(keys.shape[0], dtype=torch.bool)
    flat[order[:count]] = True
    return dict(zip(names, flat.split([scores[n].numel() for n in names])))


class _ScoreMap(TrainerCallback):
    """After every mask-phase step: update the score map, record the size ratio, stop at ``stop_retention``;
    the map travels with the Trainer's checkpoints so that a killed mask phase resumes with it."""

    def __init__(self, layers: dict[str, MaskedLowRankLinear], shapes: dict, stop: float, schedule,
                 lora_rank: dict[str, int], progress: bool = False) -> None:
        self.layers, self.shapes, self.stop, self.schedule = layers, shapes, stop, schedule
        self.lora_rank = lora_rank
        self.progress, self.bar = progress, None
        self.scores = {n: m.mask.detach().float().cpu().clone() for n, m in layers.items()}
        self.last_positive = {n: s.clone() for n, s in self.scores.items()}
        self.history: list[dict] = []

    def ratio(self) -> float:
        """The size of the model :meth:`AcipFit.materialize` would make now: live entries plus the merged LoRA."""
        return size_ratio({n: int(m.live().sum()) for n, m in self.layers.items()}, self.shapes, self.lora_rank)

    def on_step_end(self, args, state, control, **kwargs):
        for n, m in self.layers.items():
            update_scores(self.scores[n], m.mask.detach().float().cpu(), self.last_positive[n])
        ratio = self.ratio()
        self.history.append({"step": state.global_step, "ratio": ratio, "lambda": self.schedule(state.global_step)})
        self._show(state.global_step, ratio)
        if ratio <= self.stop:
            control.should_training_stop = True
        return control

    def on_train_begin(self, args, state, control, **kwargs):
        if self.progress and self.bar is None:
            # the Trainer's own bar would count to the step cap (50,000) while the phase ends at a size ratio
            from tqdm.auto import tqdm

            self.bar = tqdm(total=1000, desc=f"ACIP mask phase, size ratio -> {self.stop}",
                            bar_format="{desc}: {percentage:3.0f}%|{bar}| [{elapsed}]")
            if self.history:  # resumed from a checkpoint
                self._show(self.history[-1]["step"], self.history[-1]["ratio"])

    def on_train_end(self, args, state, control, **kwargs):
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def _show(self, step: int, ratio: float) -> None:
        """The bar's position: the share of the way from the full size (1.0) to the stop ratio."""
        if self.bar is None:
            return
        self.bar.n = min(1000, max(0, round(1000 * (1.0 - ratio) / (1.0 - self.stop))))
        self.bar.set_description_str(f"ACIP mask phase: step {step}, size ratio {ratio:.3f} -> {self.stop}, "
                                     f"lambda {self.schedule(step):.3g}", refresh=False)
        self.bar.refresh()

    def on_save(self, args, state, control, **kwargs):
        from safetensors.torch import save_file

        ckpt = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        ckpt.mkdir(parents=True, exist_ok=True)
        with atomic_file(ckpt / "acip_scores.safetensors") as tmp:
            save_file({**{f"score.{n}": t for n, t in self.scores.items()},
                       **{f"last.{n}": t for n, t in self.last_positive.items()},
                       # PEFT checkpoints hold the adapters only: the masks travel here
                       **{f"mask.{n}": m.mask.detach().cpu().contiguous() for n, m in self.layers.items()}},
                      str(tmp))
        write_json(ckpt / "acip_history.json", self.history)

    def restore(self, ckpt: str) -> None:
        from safetensors.torch import load_file

        state = load_file(str(Path(ckpt) / "acip_scores.safetensors"))
        self.scores = {n: state[f"score.{n}"] for n in self.scores}
        self.last_positive = {n: state[f"last.{n}"] for n in self.scores}
        with torch.no_grad():
            for n, m in self.layers.items():
                m.mask.copy_(state[f"mask.{n}"])
        self.history = json.loads((Path(ckpt) / "acip_history.json").read_text())


def _mask_trainer_class(mask_lr: float, lora_lr: float, schedule):
    """SFTTrainer whose loss adds ``lambda_t sum relu(m)`` (float32) and whose AdamW has one group per lr."""
    from trl import SFTTrainer

    class AcipTrainer(SFTTrainer):
        def create_optimizer(self, model=None):
            if self.optimizer is not None:  # handed over (the post-tune continues the mask phase's)
                return self.optimizer
            params = [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]
            masks = [p for n, p in params if n.endswith(".mask")]
            others = [p for n, p in params if not n.endswith(".mask")]
            groups = [g for g in ({"params": masks, "lr": mask_lr}, {"params": others, "lr": lora_lr}) if g["params"]]
            self.optimizer = torch.optim.AdamW(groups, lr=lora_lr, weight_decay=0.0)
            return self.optimizer

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            out = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            if not model.training:
                return out
            loss = out[0] if return_outputs else out
            penalty = sum(torch.relu(p.float()).sum() for n, p in model.named_parameters() if n.endswith(".mask")
                          and p.requires_grad)
            loss = loss + schedule(self.state.global_step) * penalty
            return (loss, out[1]) if return_outputs else loss

    return AcipTrainer


def _lora_parts(peft_model) -> dict[str, tuple]:
    """Per masked layer (unwrapped name): ``(masked layer, B, A, scaling)`` of its PEFT ``layer`` LoRA."""
    from air_ft.lora import LowRankLoraLinear

    out = {}
    for name, mod in peft_model.named_modules():
        if isinstance(mod, LowRankLoraLinear) and isinstance(mod.get_base_layer(), MaskedLowRankLinear):
            out[_unwrapped_name(name)] = (mod.get_base_layer(), mod.lora_B["default"].weight.detach(),
                          mod.lora_A["default"].weight.detach(), float(mod.scaling["default"]))
    return out


@dataclasses.dataclass
class AcipFit:
    """The result of :func:`acip_fit`: the parametrized model with its trained masks and LoRA, the score map, and
    the record of the run. :meth:`materialize` turns it into a factored model of any size it reached."""

    model: nn.Module  # PEFT-wrapped parametrized model
    tok: object
    scores: dict[str, torch.Tensor]
    last_positive: dict[str, torch.Tensor]
    sigmas: dict[str, torch.Tensor]
    shapes: dict[str, tuple[int, int]]
    history: list[dict]
    settings: dict

    @property
    def retention_reached(self) -> float:
        """The lowest size ratio the mask phase reached: smaller targets are refused."""
        return min((h["ratio"] for h in self.history), default=1.0)

    @property
    def lora_rank(self) -> dict[str, int]:
        return {n: self.settings["lora_rank"] for n in self.shapes}

    def lora_share(self, model: nn.Module) -> float:
        """Of the factored layers' parameters in a materialized ``model``, the share its merged LoRA accounts for
        (``r (m + n)`` of every layer left factored)."""
        r = self.settings["lora_rank"]
        lora = total = 0
        for name, (m, n) in self.shapes.items():
            layer = model.get_submodule(name)
            if isinstance(layer, LowRankLinear):
                lora += r * (m + n)
                total += layer.rank * (m + n)
        return lora / total if total else 0.0

    @property
    def tokens(self) -> int:
        """Training tokens spent: mask phase + post-tune."""
        s = self.settings
        return (len(self.history) + s["post_tune_done"]) * s["batch_size"] * s["seq_len"]

    def materialize(self, retention: float) -> nn.Module:
        """A factored model (``LowRankLinear`` layers, LoRA merged exactly, the gate folded in, the factors
        balanced as :func:`air_ft.compress` makes them) whose size ratio, LoRA included, is the smallest one at or
        above ``retention``; no training."""
        from air_ft.lora import concat_factors, truncate_factors

        if not 0.0 < retention < 1.0:
            raise RecipeError(f"retention must lie strictly between 0 and 1, got {retention!r}")
        if retention < self.retention_reached - 1e-9:
            raise RecipeError(f"retention {retention} is below what the mask phase reached "
                              f"({self.retention_reached:.3f}); fit again with a lower stop_retention")
        parts = _lora_parts(self.model)
        lora_rank = {n: b.shape[1] for n, (_, b, _, _) in parts.items()}
        kept = select_entries(self.scores, self.last_positive, self.sigmas, self.shapes, retention, lora_rank)
        base = copy.deepcopy(self.model.get_base_model())
        # the Trainer leaves an instance-level `forward` wrapper that closes over the *original* model: a copy
        # must run its own modules, so the class's forward is restored
        for attr in ("forward", "_original_forward"):
            base.__dict__.pop(attr, None)
        for name, (layer, b, a, scaling) in parts.items():
            keep = kept[name].to(layer.factor_u.weight.device)
            u = layer.factor_u.weight.detach()[:, keep].float() * layer.scale  # g = s on every kept entry
            v = layer.factor_v.weight.detach()[keep].float()
            u, v = concat_factors(u, v, b.float(), a.float(), scaling)
            m, n = self.shapes[name]
            bias = layer.factor_u.bias.detach() if layer.factor_u.bias is not None else None
            dtype, device = layer.factor_u.weight.dtype, layer.factor_u.weight.device
            if u.shape[1] * (m + n) >= m * n:  # saves nothing: dense, as the truncated product
                new = nn.Linear(n, m, bias=bias is not None, dtype=dtype, device=device)
                with torch.no_grad():
                    new.weight.copy_(u @ v)
                    if bias is not None:
                        new.bias.copy_(bias)
            else:
                # the project's factor convention, U sqrt(sigma) and sqrt(sigma) V^T (same product): ACIP's own
                # split, U sqrt(s) and Sigma V^T / sqrt(s), puts almost all of the scale in V, so a LoRA on the
                # factors (``lora.placement: factors``) would train U with a far larger step than V
                u, v = truncate_factors(u, v, u.shape[1])
                new = LowRankLinear.from_factors(u, v, bias, dtype=dtype, device=device)
            set_module(base, name, new)
        base.eval()
        record_factoring(base, "acip", retention)
        return base

    def save(self, out_dir: str | os.PathLike) -> Path:
        """The parametrized model (safetensors), the score map and the record (JSON); written atomically."""
        from safetensors.torch import save_file

        with atomic_dir(out_dir) as tmp:
            state = {k: v.detach().contiguous().cpu() for k, v in self.model.get_base_model().state_dict().items()}
            seen, unique = set(), {}
            for k, v in state.items():  # tied embeddings: one copy
                if v.data_ptr() not in seen:
                    seen.add(v.data_ptr())
                    unique[k] = v
            save_file(unique, str(tmp / "model.safetensors"))
            save_file({**{f"score.{n}": t for n, t in self.scores.items()},
                       **{f"last.{n}": t for n, t in self.last_positive.items()},
                       **{f"sigma.{n}": t for n, t in self.sigmas.items()}}, str(tmp / "scores.safetensors"))
            self.model.get_base_model().config.save_pretrained(tmp)
            if self.tok is not None:
                self.tok.save_pretrained(tmp)
            write_json(tmp / FIT_MARKER, {"format": "air_ft-acip-fit", "shapes": self.shapes,
                                          "history": self.history, "settings": self.settings})
        return Path(out_dir)

    @classmethod
    def load(cls, path: str | os.PathLike) -> AcipFit:
        """Rebuild a fit written by :meth:`save` (no pickle, no training)."""
        from safetensors.torch import load_file
        from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

        from air_ft.lora import apply_lora

        path = Path(path)
        if not (path / FIT_MARKER).exists():
            raise AssetError(f"{path} holds no ACIP fit ({FIT_MARKER} missing); run acip_fit and save it")
        meta = json.loads((path / FIT_MARKER).read_text())
        s = meta["settings"]
        config = AutoConfig.from_pretrained(path)
        model = AutoModelForCausalLM.from_config(config)
        for name, (m, n) in meta["shapes"].items():
            old = model.get_submodule(name)
            set_module(model, name, MaskedLowRankLinear(n, m, min(m, n), bias=old.bias is not None,
                                                        dtype=old.weight.dtype, scale=s["scale"]))
        peft_model = apply_lora(model, "layer", s["lora_rank"], s["lora_alpha"], s["lora_dropout"])
        state = load_file(str(path / "model.safetensors"))
        missing, unexpected = peft_model.get_base_model().load_state_dict(state, strict=False)
        missing = [k for k in missing if not k.endswith("lm_head.weight")]
        if missing or unexpected:
            raise CheckpointError(f"ACIP fit {path} does not match its config: missing {missing[:3]}, unexpected "
                               f"{unexpected[:3]}")
        if getattr(config, "tie_word_embeddings", False):
            peft_model.get_base_model().tie_weights()
        peft_model.eval()
        sc = load_file(str(path / "scores.safetensors"))
        names = list(meta["shapes"])
        tok = AutoTokenizer.from_pretrained(path) if (path / "tokenizer_config.json").exists() else None
        return cls(peft_model, tok, {n: sc[f"score.{n}"] for n in names}, {n: sc[f"last.{n}"] for n in names},
                   {n: sc[f"sigma.{n}"] for n in names}, {n: tuple(v) for n, v in meta["shapes"].items()},
                   meta["history"], s)


def acip_fit(model: nn.Module, tok, texts: list[str], max_steps: int | None = None, stop_retention: float = 0.4,
             seed: int = 0, lambda_init: float = 1e-3, lambda_growth: float = 1.01, lambda_every: int = 4,
             mask_lr: float = 5e-5, lora_lr: float = 5e-5, lora_rank: int = 32, lora_alpha: float = 16.0,
             lora_dropout: float = 0.05, post_tune_steps: int = 1000, seq_len: int = 1024, batch_size: int = 4,
             scale: float = 0.02, output_dir: str | os.PathLike | None = None, save_steps: int = 50,
             progress: bool = True, callbacks: list | None = None) -> AcipFit:
    """ACIP's mask phase and post-tune on ``texts`` (packed ``seq_len`` blocks); ``model`` is left unchanged.

    Args:
        max_steps: a bound on mask-phase steps that you set; None (the reference's behaviour) runs until the size
            ratio reaches ``stop_retention`` (at most the reference's own 50,000 steps). Ending at the bound above
            ``stop_retention`` is an error that says what to change.
        stop_retention: size ratio (the materialized model's, merged LoRA included) at which the mask phase
            stops; the lowest retention :meth:`AcipFit.materialize` accepts.
        lambda_init, lambda_growth, lambda_every: ``lambda_t = lambda_init * lambda_growth ** floor(t / every)``.
        mask_lr, lora_lr: constant AdamW learning rates (weight decay 0) of the masks and of LoRA.
        lora_rank, lora_alpha, lora_dropout: the LoRA on each parametrized layer (reference: 32, 16, 0.05).
        post_tune_steps: LoRA-only steps with the masks frozen, continuing the mask phase's optimizer, on blocks
            the mask phase never saw.
        scale: initial mask value ``s`` (also the gate's forward value).
        output_dir: Trainer checkpoints every ``save_steps`` (a killed mask phase resumes from the newest, with its
            score map); default a temporary folder, no checkpoints.
        callbacks: extra Trainer callbacks for the mask phase.
    """
    import tempfile

    from transformers import set_seed
    from transformers.trainer_utils import get_last_checkpoint

    from air_ft.lora import apply_lora
    from air_ft.train import build_trainer
    from air_ft.train_data import blocks_dataset

    if not 0.0 < stop_retention < 1.0:
        raise RecipeError(f"stop_retention must lie strictly between 0 and 1, got {stop_retention!r}")
    bound = REFERENCE_STEP_CAP if max_steps is None else max_steps
    for name, val in (("max_steps", bound),
                      ("lambda_every", lambda_every), ("lora_rank", lora_rank), ("seq_len", seq_len),
                      ("batch_size", batch_size)):
        if not isinstance(val, int) or val < 1:
            raise RecipeError(f"{name} must be an integer >= 1, got {val!r}")
    if post_tune_steps < 0 or min(mask_lr, lora_lr, lambda_init, scale) <= 0 or lambda_growth < 1:
        raise RecipeError("need post_tune_steps >= 0, positive learning rates, lambda_init and scale, and "
                          "lambda_growth >= 1")
    prepare_model(model)
    set_seed(seed)
    mask_blocks, post_blocks = split_blocks(tok, texts, seq_len, post_tune_steps * batch_size, seed)
    work = copy.deepcopy(model)
    sigmas = parametrize(work, scale)
    peft_model = apply_lora(work, "layer", lora_rank, lora_alpha, lora_dropout)
    layers = _masked_layers(peft_model)
    shapes = {n: (m.out_features, m.in_features) for n, m in layers.items()}
    for m in layers.values():
        m.mask.requires_grad_(True)

    def schedule(step: int) -> float:
        return lambda_init * lambda_growth ** (step // lambda_every)

    score_map = _ScoreMap(layers, shapes, stop_retention, schedule, {n: lora_rank for n in layers}, progress)
    # the reference does not clip: the penalty's gradient alone (lambda x sqrt(live entries)) would keep a clip
    # at 1.0 active for the whole phase and shrink every step
    no_clip = {"max_grad_norm": 0.0}
    with tempfile.TemporaryDirectory(prefix="air_ft_acip_") as tmp:
        out = Path(output_dir or tmp)
        cfg = TrainConfig(max_steps=bound, learning_rate=lora_lr, seq_len=seq_len, batch_size=batch_size,
                          seed=seed, warmup_ratio=0.0, lr_scheduler="constant", eval_steps=0,
                          save_steps=save_steps if output_dir else 0, progress=False)  # the score map's bar
        trainer = build_trainer(peft_model, tok, blocks_dataset(mask_blocks), None, cfg, out / "mask_phase",
                                [score_map, *(callbacks or [])],
                                trainer_cls=_mask_trainer_class(mask_lr, lora_lr, schedule), args_overrides=no_clip)
        last = get_last_checkpoint(str(out / "mask_phase")) if (out / "mask_phase").is_dir() else None
        if last:
            score_map.restore(last)
        if not (last and score_map.history and score_map.history[-1]["ratio"] <= stop_retention):
            trainer.train(resume_from_checkpoint=last)
        reached = min((h["ratio"] for h in score_map.history), default=1.0)
        if reached > stop_retention:
            raise RecipeError(f"ACIP's mask phase ended at max_steps {bound} with size ratio {reached:.3f}, above "
                              f"stop_retention {stop_retention}: raise acip.max_steps (or leave it unset) or "
                              "acip.lambda_growth")
        for m in layers.values():
            m.mask.requires_grad_(False)
        if post_tune_steps:
            # the reference goes on with the same optimizer: LoRA keeps its AdamW moments, the frozen masks get
            # no gradient and so no update
            post = dataclasses.replace(cfg, max_steps=post_tune_steps, save_steps=0, progress=progress)
            adamw = getattr(trainer.optimizer, "optimizer", trainer.optimizer)  # accelerate's wrapper unwrapped
            tuner = build_trainer(peft_model, tok, blocks_dataset(post_blocks), None, post, out / "post_tune",
                                  trainer_cls=_mask_trainer_class(mask_lr, lora_lr, schedule),
                                  args_overrides=no_clip, trainer_kwargs={"optimizers": (adamw, None)})
            tuner.train()
    peft_model.eval()
    settings = {"max_steps": max_steps, "stop_retention": stop_retention, "seed": seed, "lambda_init": lambda_init,
                "lambda_growth": lambda_growth, "lambda_every": lambda_every, "mask_lr": mask_lr, "lora_lr": lora_lr,
                "lora_rank": lora_rank, "lora_alpha": lora_alpha, "lora_dropout": lora_dropout,
                "post_tune_steps": post_tune_steps, "post_tune_done": post_tune_steps, "seq_len": seq_len,
                "batch_size": batch_size, "scale": scale, "mask_dtype": "float32", "data": "packed blocks",
                "max_grad_norm": None, "post_tune_optimizer": "continued", "size_unit": "materialized, LoRA merged",
                "mask_blocks": int(mask_blocks.shape[0]), "post_tune_blocks": int(post_blocks.shape[0])}
    return AcipFit(peft_model, tok, score_map.scores, score_map.last_positive, sigmas, shapes, score_map.history,
                   settings)


def split_blocks(tok, texts: list[str], seq_len: int, post_blocks: int, seed: int = 0):
    """The block pool (every distinct ``seq_len`` block of ``texts``) split in two disjoint parts, seeded: the
    post-tune's ``post_blocks`` and the mask phase's rest (which it cycles through, epoch after epoch, for as
    many steps as it runs)."""
    from air_ft.train_data import text_blocks

    pool = text_blocks(tok, texts, seq_len, None, seed)
    pool = torch.unique(pool, dim=0)  # a short source is repeated in the pool: keep each block once
    pool = pool[torch.randperm(pool.shape[0], generator=torch.Generator().manual_seed(seed))]
    if post_blocks >= pool.shape[0]:
        raise DataError(f"the texts hold {pool.shape[0]} blocks of {seq_len} tokens: too few to keep the "
                        f"post-tune's {post_blocks} apart from the mask phase's; give more text or fewer "
                        "acip.post_tune_steps")
    return pool[post_blocks:], pool[:post_blocks]
