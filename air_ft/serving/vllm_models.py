"""vLLM model classes for air_ft's factored checkpoints, made of vLLM's own parallel linear layers.

Imported only inside a vLLM process (the plugin registers these classes lazily, by name). Each class subclasses
vLLM's own model for the architecture and, when the checkpoint's ``config.json`` carries air_ft's ranks
(``air_ft.ranks``), replaces the decoder's projections by factored ones after vLLM has built the model; without
ranks it is vLLM's model unchanged. Weights load from the safetensors as air_ft saved them
(``<proj>.factor_v.weight``, ``<proj>.factor_u.weight``, ``<proj>.factor_u.bias``); nothing is converted.

Tensor parallelism, by construction:

* a column-parallel projection (``qkv_proj``, ``gate_up_proj``) keeps ``V`` whole on every rank, one
  :class:`ReplicatedLinear` that stacks the ``V`` of every member reading the same input (q/k/v, gate/up: one
  matmul, as :func:`air_ft.modeling.fuse_shared_inputs` does in the transformers path), and shards each member's
  ``U`` by output rows (:class:`ColumnParallelLinear`, key/value heads replicated as vLLM's QKV layer does when
  there are fewer of them than ranks);
* a row-parallel projection (``o_proj``, ``down_proj``) shards ``V`` by input columns (:class:`RowParallelLinear`,
  whose all-reduce then carries the rank-``k`` intermediate instead of the hidden size) and keeps ``U`` whole.

A member left dense in a factored group (its rank absent from the map) is a column-parallel dense slice of the
group; a row projection left dense keeps vLLM's layer.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

import torch
from torch import nn
from vllm.model_executor.layers.linear import (
    ColumnParallelLinear,
    QKVParallelLinear,
    ReplicatedLinear,
    RowParallelLinear,
)

from air_ft.serving import COVERED, STACKED, air_ft_ranks

__all__ = ["FactoredColumnParallel", "FactoredRowParallel", "factor_projections"]

# a checkpoint tensor of a projection: <parent>.<proj>.[factor_u.|factor_v.]weight|bias
_WEIGHT = re.compile(r"^(?P<parent>.+?)\.(?P<proj>[A-Za-z0-9_]+)\.(?:(?P<part>factor_[uv])\.)?(?P<kind>weight|bias)$")


def _column_shards(dense: nn.Module) -> list[tuple[int, int, int]]:
    """``(output size, shard index, shard count)`` of each member of a vLLM column-parallel layer, in output order.

    Query rows split over all ranks; key/value rows too when there are at least as many heads as ranks, else each
    head is replicated on ``ranks / heads`` ranks (vLLM's QKV rule).
    """
    rank, size = dense.tp_rank, dense.tp_size
    if isinstance(dense, QKVParallelLinear):
        replicas = dense.num_kv_head_replicas
        kv_rank, kv_count = (rank // replicas, size // replicas)
        return [(dense.total_num_heads * dense.head_size, rank, size),
                (dense.total_num_kv_heads * dense.head_size, kv_rank, kv_count),
                (dense.total_num_kv_heads * dense.v_head_size, kv_rank, kv_count)]
    sizes = getattr(dense, "output_sizes", None) or [dense.output_size]
    return [(s, rank, size) for s in sizes]


class FactoredColumnParallel(nn.Module):
    """A column-parallel projection whose members are factored: ``z = V_cat x`` once, then ``y_i = U_i z_i``.

    ``V_cat`` (all members' ``V`` stacked, ``sum(k_i) x n``) is replicated; each ``U_i`` is sharded by output rows.
    The members' outputs are concatenated in the dense layer's order, so the model's own forward (split into q/k/v,
    or ``SiluAndMul`` on gate|up) is unchanged.
    """

    def __init__(self, dense: nn.Module, ranks: list[int | None], prefix: str) -> None:
        super().__init__()
        if dense.skip_bias_add:
            raise NotImplementedError(f"{prefix}: a column layer that returns its bias separately is not covered")
        shards = _column_shards(dense)
        if len(shards) != len(ranks):
            raise ValueError(f"{prefix}: {len(ranks)} ranks for a layer of {len(shards)} members")
        dtype, bias = dense.params_dtype, dense.bias is not None
        self.ranks = list(ranks)
        self.starts, total = [], 0
        for k in self.ranks:
            self.starts.append(total)
            total += k or 0
        self.factor_v = ReplicatedLinear(dense.input_size, total, bias=False, params_dtype=dtype,
                                         prefix=f"{prefix}.factor_v", return_bias=False)
        self.members = nn.ModuleList(
            ColumnParallelLinear(k or dense.input_size, out, bias=bias, params_dtype=dtype,
                                 prefix=f"{prefix}.members.{i}", return_bias=False, tp_rank=r, tp_size=n)
            for i, ((out, r, n), k) in enumerate(zip(shards, self.ranks)))
        self.return_bias = dense.return_bias

    def forward(self, x: torch.Tensor):
        z = self.factor_v(x)
        outs = [m(z[..., s:s + k] if k else x) for m, s, k in zip(self.members, self.starts, self.ranks)]
        y = outs[0] if len(outs) == 1 else torch.cat(outs, dim=-1)
        return (y, None) if self.return_bias else y

    def load(self, member: int, part: str | None, kind: str, tensor: torch.Tensor) -> str:
        """Load one checkpoint tensor of member ``member``; returns the parameter's name in this module."""
        k = self.ranks[member]
        if part == "factor_v":
            if not k or kind != "weight" or tensor.shape != (k, self.factor_v.input_size):
                raise ValueError(f"factor_v {kind} of shape {tuple(tensor.shape)} does not fit member {member}")
            self.factor_v.weight.data[self.starts[member]:self.starts[member] + k].copy_(tensor)
            return "factor_v.weight"
        if (part == "factor_u") != bool(k):
            raise ValueError(f"member {member} is {'factored' if k else 'dense'}; got a {part or 'dense'} tensor")
        layer = self.members[member]
        param = getattr(layer, kind)
        layer.weight_loader(param, tensor)
        return f"members.{member}.{kind}"


class FactoredRowParallel(nn.Module):
    """A row-parallel projection factored as ``y = U (V x) + b``: ``V`` sharded by input columns (its all-reduce
    carries the rank-``k`` intermediate), ``U`` and the bias whole on every rank."""

    def __init__(self, dense: RowParallelLinear, rank: int, prefix: str) -> None:
        super().__init__()
        dtype = dense.params_dtype
        self.factor_v = RowParallelLinear(dense.input_size, rank, bias=False,
                                          input_is_parallel=dense.input_is_parallel,
                                          reduce_results=dense.reduce_results, params_dtype=dtype,
                                          prefix=f"{prefix}.factor_v", return_bias=False,
                                          disable_tp=dense.disable_tp)
        self.factor_u = ReplicatedLinear(rank, dense.output_size, bias=dense.bias is not None, skip_bias_add=True,
                                         params_dtype=dtype, prefix=f"{prefix}.factor_u")
        # without the reduce, every rank returns a partial sum that the caller adds up: the bias once, on rank 0
        self.add_bias = not dense.skip_bias_add and (dense.reduce_results or dense.tp_rank == 0)
        self.return_bias, self.skip_bias_add = dense.return_bias, dense.skip_bias_add

    def forward(self, x: torch.Tensor):
        y, b = self.factor_u(self.factor_v(x))
        if b is not None and self.add_bias:
            y = y + b
        if not self.return_bias:
            return y
        return y, (b if self.skip_bias_add else None)

    def load(self, member: int, part: str | None, kind: str, tensor: torch.Tensor) -> str:
        if part not in ("factor_u", "factor_v"):
            raise ValueError("a factored row layer takes factor_u / factor_v tensors only")
        layer = getattr(self, part)
        param = getattr(layer, kind)
        layer.weight_loader(param, tensor)
        return f"{part}.{kind}"


def _members(leaf: str) -> tuple[str, ...]:
    return STACKED.get(leaf, (leaf,))


def factor_projections(model: nn.Module, config) -> dict[str, tuple[nn.Module, int]]:
    """Replace the projections that ``config.air_ft.ranks`` names by factored layers.

    Returns the routing table: checkpoint projection name (``model.layers.0.self_attn.q_proj``) ->
    (factored module, member index). Raises if a ranked layer has no counterpart in the vLLM model.
    """
    ranks = air_ft_ranks(config)
    if not ranks:
        return {}
    routes: dict[str, tuple[nn.Module, int]] = {}
    for name, module in list(model.named_modules()):
        parent, _, leaf = name.rpartition(".")
        members = [f"{parent}.{m}" if parent else m for m in _members(leaf)]
        member_ranks = [ranks.get(m) for m in members]
        if not any(member_ranks) or not isinstance(module, (ColumnParallelLinear, RowParallelLinear)):
            continue
        if isinstance(module, RowParallelLinear):
            new = FactoredRowParallel(module, member_ranks[0], name)
        else:
            new = FactoredColumnParallel(module, member_ranks, name)
        model.get_submodule(parent).register_module(leaf, new)
        routes.update({m: (new, i) for i, m in enumerate(members)})
    unplaced = sorted(n for n, k in ranks.items() if k and n not in routes)
    if unplaced:
        arch = type(model).__name__
        raise ValueError(f"air_ft: the factored layers {unplaced[:3]} have no counterpart in vLLM's {arch}; "
                         "write a dense copy with `air-ft export-dense CHECKPOINT OUTPUT` and serve that")
    return routes


def _factored(base: type[nn.Module]) -> type[nn.Module]:
    """vLLM's model class ``base``, with air_ft's factored projections when the config carries ranks."""

    class Factored(base):
        air_ft_factored = True

        def __init__(self, *, vllm_config, prefix: str = "", **kwargs) -> None:
            super().__init__(vllm_config=vllm_config, prefix=prefix, **kwargs)
            self._air_ft_routes = factor_projections(self, vllm_config.model_config.hf_config)
            self._air_ft_names = {id(m): n for n, m in self.named_modules()}

        def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
            if not self._air_ft_routes:
                return super().load_weights(weights)
            mine: set[str] = set()

            def others():
                for name, tensor in weights:
                    match = _WEIGHT.match(name)
                    route = match and self._air_ft_routes.get(f"{match['parent']}.{match['proj']}")
                    if not route:
                        yield name, tensor
                        continue
                    module, member = route
                    param = module.load(member, match["part"], match["kind"], tensor)
                    mine.add(f"{self._air_ft_names[id(module)]}.{param}")

            return set(super().load_weights(others()) or ()) | mine

    Factored.__name__ = Factored.__qualname__ = f"AirFt{base.__name__}"
    Factored.__doc__ = f"vLLM's {base.__name__} serving air_ft factored checkpoints (and dense ones unchanged)."
    return Factored


def _base(arch: str) -> type[nn.Module]:
    import importlib

    module, cls = COVERED[arch]
    return getattr(importlib.import_module(f"vllm.model_executor.models.{module}"), cls)


def __getattr__(name: str):
    # the plugin registers "air_ft.serving.vllm_models:AirFt<Arch>"; the class is built on first use, so that an
    # architecture vLLM's build lacks (e.g. Gemma-3 in an older vLLM) never breaks the others
    arch = name.removeprefix("AirFt")
    if name.startswith("AirFt") and arch in COVERED:
        cls = _factored(_base(arch))
        globals()[name] = cls
        return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
