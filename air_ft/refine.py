"""Block refinement: a short local optimization of one decoder block's factors after the block is factored.

With ``compress.refine_steps > 0`` and ``sequential`` streaming, each block's factors (the ``U`` and ``V`` of its
factored layers, nothing else) are tuned by Adam so that the compressed block, fed the hidden states that the
compressed blocks before it produce, reproduces the dense model's hidden states at the block's exit on the calibration
windows (docs/method.md section 14): the block corrects its own truncation error and what the blocks before it left.
The error is the relative squared error of all exit states together (``loss="hidden"``) or each token's relative
squared error, averaged over the tokens (``loss="token"``: a token with a massive hidden state, such as an attention
sink's, counts as much as any other). The budget is fixed and stated (steps x windows per step x tokens per window);
the best factors seen on the calibration data are kept, so a block's error never ends above the one its factoring
gave.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
from torch import nn

from air_ft import dist
from air_ft.modeling import LowRankLinear

__all__ = ["REFINE_LOSSES", "REFINE_LR_SCALES", "RefineRecord", "refine_block", "refine_error"]

REFINE_LOSSES = ("hidden", "token")
REFINE_LR_SCALES = ("absolute", "rms")


@dataclass
class RefineRecord:
    """One block's refinement: relative squared error of its exit hidden states before and after, the steps and
    tokens it took, its seconds; ``outputs``: the block's exit hidden states with the factors it keeps, per batch
    (the next block's inputs, so the stream need not run the block again), or None where they were not kept."""

    before: float
    after: float
    steps: int
    tokens: int
    seconds: float
    outputs: list[torch.Tensor] | None = field(default=None, repr=False)

    def to_json(self) -> dict:
        return {"before": self.before, "after": self.after, "steps": self.steps, "tokens": self.tokens,
                "seconds": self.seconds}


def _out(block: nn.Module, h: torch.Tensor, extra) -> torch.Tensor:
    args, kwargs = extra
    out = block(h, *args, **kwargs)
    return out[0] if isinstance(out, (tuple, list)) else out


def refine_error(out: torch.Tensor, y: torch.Tensor, loss: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The numerator and denominator of one batch's refinement error, in ``out``'s dtype (the loss is their sums'
    ratio over batches). ``hidden``: ``||out - y||^2`` and ``||y||^2`` over every element; ``token``: the sum over
    tokens of ``||out_t - y_t||^2 / ||y_t||^2`` (the last dimension is the hidden one) and the token count."""
    diff = (out - y).square()
    if loss == "hidden":
        return diff.sum(), y.square().sum()
    if loss == "token":
        per_token = diff.sum(-1) / y.square().sum(-1).clamp_min(torch.finfo(y.dtype).tiny)
        return per_token.sum(), torch.tensor(float(per_token.numel()), dtype=out.dtype, device=out.device)
    raise ValueError(f"refine loss {loss!r} is unknown; choose one of {REFINE_LOSSES}")


def _error(block: nn.Module, hidden: list[torch.Tensor], extra: list, targets: list[torch.Tensor],
           sharded: bool, loss: str, outputs: list | None = None) -> float:
    """The refinement error (:func:`refine_error`) over this process's batches (numerator and denominator summed
    over the processes when each holds its own share); the block's outputs are appended to ``outputs`` when given."""
    num = torch.zeros((), dtype=torch.float64)
    den = torch.zeros((), dtype=torch.float64)
    with torch.no_grad():
        for b, (h, y) in enumerate(zip(hidden, targets)):
            out = _out(block, h, extra[b])
            n, d = refine_error(out.double(), y.double(), loss)
            num += n.cpu()
            den += d.cpu()
            if outputs is not None:
                outputs.append(out)
    if sharded:
        num, den = dist.all_reduce_sum(num), dist.all_reduce_sum(den)
    return float(num / den)


def refine_block(block: nn.Module, hidden: list[torch.Tensor], extra: list, targets: list[torch.Tensor],
                 steps: int, lr: float, sharded: bool = True, loss: str = "hidden",
                 lr_scale: str = "absolute", keep_best: bool = True) -> RefineRecord:
    """Tune the factors of ``block``'s :class:`~air_ft.modeling.LowRankLinear` layers in place.

    Args:
        block: a decoder block whose target layers are already factored.
        hidden: its input hidden states, one tensor per calibration batch (this process's share).
        extra: the other arguments the block receives per batch (``BlockInputs.extra[i]``).
        targets: the dense model's hidden states at the block's exit, per batch.
        steps: Adam steps; batch ``s mod len(hidden)`` at step ``s``.
        lr: Adam's learning rate.
        sharded: under several processes, each holds its own share of the batches (``data_parallel``): they step
            together with gradients averaged over them. Otherwise every process holds every batch and steps alone,
            to the same bits.
        loss: ``hidden`` or ``token`` (:func:`refine_error`): what the steps lower and the kept-best rule reads.
        lr_scale: ``absolute``: every factor steps at ``lr`` (Adam moves each entry by about ``lr`` whatever its
            size); ``rms``: each factor's rate is ``lr`` times its root mean square at the start, so a step moves
            every factor by the same fraction of its size, and the result does not depend on the model's weight
            scale or on how a layer's scale is split between ``U`` and ``V`` (``U c``, ``V / c`` refine to the same
            product).
        keep_best: keep the factors the block had when the steps did not lower its error (what a compression
            does); False keeps where the steps went and records the error they reached (a probe of the rate).
    """
    if loss not in REFINE_LOSSES:
        raise ValueError(f"refine loss {loss!r} is unknown; choose one of {REFINE_LOSSES}")
    if lr_scale not in REFINE_LR_SCALES:
        raise ValueError(f"refine lr scale {lr_scale!r} is unknown; choose one of {REFINE_LR_SCALES}")
    t0 = time.perf_counter()
    params = [p for m in block.modules() if isinstance(m, LowRankLinear)
              for p in (m.factor_u.weight, m.factor_v.weight)]
    sharded = sharded and dist.world() > 1
    first: list[torch.Tensor] = []
    before = _error(block, hidden, extra, targets, sharded, loss, first)
    if not params or steps == 0:
        return RefineRecord(before, before, 0, 0, time.perf_counter() - t0, first)
    del first  # the steps change the factors: the outputs are measured again after them
    flags = {id(p): p.requires_grad for p in block.parameters()}
    for p in block.parameters():
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    start = [p.detach().clone() for p in params]
    if lr_scale == "rms":
        groups = [{"params": [p], "lr": lr * float(p.detach().float().square().mean().sqrt())} for p in params]
    else:
        groups = [{"params": params, "lr": lr}]
    opt = torch.optim.Adam(groups, lr=lr)
    world, tokens = (dist.world() if sharded else 1), 0
    try:
        with torch.enable_grad():
            for step in range(steps):
                b = step % len(hidden)
                y = targets[b]
                num, den = refine_error(_out(block, hidden[b], extra[b]).float(), y.float(), loss)
                opt.zero_grad(set_to_none=False)
                (num / den).backward()
                if sharded:
                    for p in params:
                        p.grad = dist.all_reduce_sum(p.grad) / world
                opt.step()
                tokens += hidden[b].shape[0] * hidden[b].shape[1] * world
        outputs: list[torch.Tensor] | None = []
        after = _error(block, hidden, extra, targets, sharded, loss, outputs)
        if keep_best and not after < before:  # keep what factoring gave when the steps did not help
            with torch.no_grad():
                for p, s in zip(params, start):
                    p.copy_(s)
            after, outputs = before, None
    finally:
        for p in block.parameters():
            p.requires_grad_(flags[id(p)])
            p.grad = None
    return RefineRecord(before, after, steps, tokens, time.perf_counter() - t0, outputs)
