"""Factored against dense in one run: size, FLOPs, peak memory, prefill and decode speed at several retentions.

    python benchmarks/efficiency.py                        # SmolLM2-135M-Instruct on this CPU
    python benchmarks/efficiency.py --device cuda --dtype bfloat16 --shape 7b    # Llama-2-7B shape, random weights
    python benchmarks/efficiency.py --shape tiny --repeats 1                     # smoke test (the tests run it)

Speed depends on the ranks, not on which method chose the factors, so the factored models are plain truncated SVDs
(no calibration needed); AIR, SVD-LLM(W) and ASVD at the same retention have the same shapes. Each retention is
measured as compressed and with the V factors of the layers that read one input stacked into one matmul
(``air_ft.modeling.fuse_shared_inputs``: q/k/v, gate/up; ``--no-fuse`` skips those rows). Writes
``benchmarks/results/efficiency_<shape>_<device>.json`` and prints each model's ratios to dense.

``--rank-maps`` measures given per-layer ranks instead (a method such as ACIP-style chooses very uneven ones): each
file is a compress stage's ``stage.json`` or a checkpoint's ``air_ft.json``, and its row is named by its folder;
layers it does not name stay dense. The study's shapes, without its checkpoints:

    python benchmarks/efficiency.py --threads 1 --no-fuse --output efficiency_study_shapes_cpu.json \
        --rank-maps benchmarks/results/study_smollm2/stages/compress/{svdllm,acip}-r0.{80,60,40}/stage.json
"""

from __future__ import annotations

import argparse
import copy
import json
from pathlib import Path

import torch
from common import MODEL, environment, set_threads, write_json

import air_ft
from air_ft.efficiency import compare, factored_at
from air_ft.modeling import fuse_shared_inputs

SHAPES = {  # (hidden, intermediate, layers, heads, kv heads, vocab)
    "tiny": (64, 160, 2, 4, 2, 256),
    "1b": (2048, 8192, 16, 32, 8, 128256),
    "7b": (4096, 11008, 32, 32, 32, 32000),
}


def build(shape: str, dtype: str, device: str):
    if shape == "smollm2":
        return air_ft.load_model(MODEL, dtype=dtype, device=device)
    from transformers import LlamaConfig, LlamaForCausalLM

    h, i, n, a, kv, v = SHAPES[shape]
    cfg = LlamaConfig(hidden_size=h, intermediate_size=i, num_hidden_layers=n, num_attention_heads=a,
                      num_key_value_heads=kv, vocab_size=v, max_position_embeddings=4096)
    with torch.device(device):
        model = LlamaForCausalLM(cfg).to(air_ft.modeling.resolve_dtype(dtype)).eval()
    return model, None


def read_ranks(path: str) -> dict[str, int]:
    """The ``ranks`` map of a compress stage marker (``result.info.ranks``) or of a checkpoint's ``air_ft.json``;
    ValueError, saying what to pass, for anything else."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"{path} cannot be read as JSON ({err})") from None
    info = ((data.get("result") or {}).get("info") or {}) if isinstance(data, dict) else {}
    ranks = data.get("ranks") or info.get("ranks") if isinstance(data, dict) else None
    if not ranks:
        raise ValueError(f"{path} holds no ranks map: pass a compress stage.json or a checkpoint's air_ft.json")
    return ranks


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", choices=["smollm2", *SHAPES], default="smollm2")
    ap.add_argument("--retentions", type=float, nargs="+", default=[0.8, 0.6, 0.4])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 16])
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--decode-steps", type=int, default=8)
    ap.add_argument("--prefill-len", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=3, help="every model measured in turns this many times (medians)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--no-fuse", action="store_true", help="skip the rows with stacked V factors")
    ap.add_argument("--rank-maps", nargs="+", default=None,
                    help="measure these per-layer ranks (compress stage.json or air_ft.json) instead of --retentions")
    ap.add_argument("--output", default=None)
    args = ap.parse_args()
    if any(not 0 < r < 1 for r in args.retentions):
        ap.error("--retentions must lie strictly between 0 and 1")
    if min(args.batch_sizes + [args.prompt_len, args.decode_steps, args.prefill_len, args.repeats, args.rounds]) < 1:
        ap.error("--batch-sizes, --prompt-len, --decode-steps, --prefill-len, --repeats and --rounds must be >= 1")
    try:  # before any loading
        rank_maps = {Path(path).parent.name: read_ranks(path) for path in args.rank_maps or []}
    except ValueError as err:
        ap.error(f"--rank-maps: {err}")
    set_threads(args.threads)
    settings = dict(batch_sizes=tuple(args.batch_sizes), prompt_len=args.prompt_len, decode_steps=args.decode_steps,
                    prefill_len=args.prefill_len, repeats=args.repeats)
    dense, tok = build(args.shape, args.dtype, args.device)
    models = {"dense": dense}
    for name, ranks in rank_maps.items():
        models[name] = factored_at(copy.deepcopy(dense), ranks)
        if not args.no_fuse:
            models[f"{name} fused"] = copy.deepcopy(models[name])
            fuse_shared_inputs(models[f"{name} fused"])
    for r in [] if rank_maps else args.retentions:
        models[f"factored r{r:.2f}"] = copy.deepcopy(dense)
        air_ft.compress(models[f"factored r{r:.2f}"], tok, None, method="svd", retention=r, progress=False)
        if not args.no_fuse:
            models[f"fused r{r:.2f}"] = copy.deepcopy(models[f"factored r{r:.2f}"])
            fuse_shared_inputs(models[f"fused r{r:.2f}"])
    # every model measured in turns, `rounds` times: a slow spell of the machine falls on all of them alike
    rows = compare({name: (lambda m=m: (m, tok)) for name, m in models.items()}, rounds=args.rounds, **settings)
    d = rows["dense"]
    print(f"{'model':<16} {'params':>9} {'FLOPs/tok':>10} {'prefill':>8} "
          + " ".join(f"{'decode b' + str(b):>11}" for b in args.batch_sizes) + "   (ratios to dense)")
    for name, e in rows.items():
        e["vs_dense"] = {"params": e["params"]["model"] / d["params"]["model"],
                         "flops_per_token": e["flops_per_token"] / d["flops_per_token"],
                         "prefill_speed": e["prefill_tokens_per_s"] / d["prefill_tokens_per_s"],
                         "peak_forward_bytes": e["peak_forward_bytes"] / max(d["peak_forward_bytes"], 1),
                         **{f"decode_latency_b{b}": e["decode_s_per_token"][str(b)] / d["decode_s_per_token"][str(b)]
                            for b in args.batch_sizes}}
        v = e["vs_dense"]
        print(f"{name:<16} {v['params']:9.2f} {v['flops_per_token']:10.2f} {v['prefill_speed']:8.2f} "
              + " ".join(f"{v[f'decode_latency_b{b}']:11.2f}" for b in args.batch_sizes))
    out = write_json(args.output or f"efficiency_{args.shape}_{args.device.split(':')[0]}.json",
                     {"rows": rows, "settings": vars(args), "environment": environment()})
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
