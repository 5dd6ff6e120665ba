"""7B-class compression on one device: a Llama-2-7B-shaped model with random weights (no hub needed).

    python benchmarks/scale.py --shape 7b                         # one GPU, bf16: the figures of record
    python benchmarks/scale.py --shape 1b                         # a smaller GPU shape
    python benchmarks/scale.py --shape tiny --device cpu --dtype float32 --num-samples 4 --seq-len 32   # smoke

Measures, in one process and one run:
- calibration time (dense Grams block by block + the influence backward passes) at ``--num-samples`` x
  ``--seq-len`` random tokens, and AIR compression time at ``--retention``;
- peak device memory of the whole compression (the allocator's peak) against the model's own bytes, and the
  process's peak host memory;
- the ALS sweep's memory bandwidth on one attention-shaped and one MLP-shaped matrix, backend against backend:
  effective bandwidth counts the minimal traffic of a rank step (read ``R`` and ``C``, write ``R``:
  ``3 m n`` floats), kernel traffic what the Triton kernels move (``5 m n``); both against the device's peak;
- decode seconds per token at batch 1 and 16 and prefill throughput: dense, factored, and factored with the
  ``V`` factors of q/k/v and gate/up stacked (:func:`air_ft.modeling.fuse_shared_inputs`).
Random weights make quality meaningless here; SmolLM2 figures (benchmarks/README.md) cover quality.
Writes benchmarks/results/scale_<device>.json (``--output`` to change).
"""

from __future__ import annotations

import argparse
import gc
import resource
import time

import torch
from common import environment, write_json

import air_ft
from air_ft.efficiency import efficiency
from air_ft.linalg import als_sweep
from air_ft.modeling import fuse_shared_inputs, resolve_dtype

SHAPES = {  # LlamaConfig fields
    "7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=32, vocab_size=32000),
    "1b": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
               num_key_value_heads=4, vocab_size=32000),
    "tiny": dict(hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=256),
}
PEAK_BANDWIDTH = {"H200": 4.8e12, "H100": 3.35e12, "A100": 2.0e12}  # bytes/s, HBM, by device name


def build(shape: str, dtype: torch.dtype, device: str, seed: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(**SHAPES[shape], max_position_embeddings=4096, tie_word_embeddings=False)
    with torch.device(device):
        model = LlamaForCausalLM(cfg).to(dtype)
    return model.eval()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def device_name(device: torch.device) -> str:
    if device.type != "cuda":
        return "cpu"
    name = torch.cuda.get_device_name(device)
    return next((k for k in PEAK_BANDWIDTH if k in name), name.replace(" ", "_")).lower()


def als_bandwidth(shapes: list[tuple[int, int]], retention: float, device: torch.device, backends: list[str],
                  peak: float | None) -> list[dict]:
    """One sweep per matrix shape and backend on a random whitened weight with C = 1 + 2 I (I ~ U[0, 1))."""
    from air_ft.linalg import rank_for_retention

    out = []
    g = torch.Generator(device=device).manual_seed(0)
    for m, n in shapes:
        k = rank_for_retention(m, n, retention)
        w = torch.randn(m, n, device=device, dtype=torch.float32, generator=g)
        c = 1.0 + 2.0 * torch.rand(m, n, device=device, dtype=torch.float32, generator=g)
        u, s, vh = torch.linalg.svd(w, full_matrices=False)
        u, s, vh = u[:, :k], s[:k], vh[:k]
        for backend in backends:
            try:
                als_sweep(w, c, u, s, vh, backend=backend)  # warm-up: kernel builds, graph capture
                sync(device)
                t0 = time.perf_counter()
                res = als_sweep(w, c, u, s, vh, backend=backend)
                sync(device)
                seconds = time.perf_counter() - t0
            except (ValueError, RuntimeError) as exc:
                out.append({"m": m, "n": n, "k": k, "backend": backend, "error": str(exc).splitlines()[0]})
                continue
            minimal = 3 * m * n * 4 * k
            row = {"m": m, "n": n, "k": k, "backend": backend, "seconds": seconds,
                   "objective_start": res.objective[0], "objective_end": res.objective[-1],
                   "effective_bytes_per_s": minimal / seconds}
            if backend == "triton":
                row["kernel_bytes_per_s"] = 5 * m * n * 4 * k / seconds
            if peak:
                row["effective_fraction_of_peak"] = row["effective_bytes_per_s"] / peak
                if "kernel_bytes_per_s" in row:
                    row["kernel_fraction_of_peak"] = row["kernel_bytes_per_s"] / peak
            out.append(row)
            print(f"ALS {m}x{n} k={k} {backend}: {seconds:.3f} s, effective {row['effective_bytes_per_s'] / 1e9:.0f} "
                  f"GB/s" + (f" ({row['effective_fraction_of_peak']:.0%} of peak)" if peak else ""), flush=True)
        del w, c, u, s, vh
    return out


def speed(model, batch_sizes: list[int], repeats: int) -> dict:
    eff = efficiency(model, None, batch_sizes=tuple(batch_sizes), prompt_len=128, decode_steps=16,
                     prefill_len=1024 if next(model.parameters()).device.type == "cuda" else 64, repeats=repeats)
    return {k: eff[k] for k in ("params", "flops_per_token", "checkpoint_bytes", "peak_forward_bytes",
                                "prefill_tokens_per_s", "decode_s_per_token")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", choices=sorted(SHAPES), default="7b")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--retention", type=float, default=0.6)
    ap.add_argument("--method", default="air", choices=["air", "svdllm"])
    ap.add_argument("--num-samples", type=int, default=128)
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--batch-size", type=int, default=2, help="calibration windows per forward/backward")
    ap.add_argument("--stats-memory-gb", type=float, default=6.0,
                    help="compress.stats_memory_gb: one influence pass's statistics (the 7B target: model + 16 GB)")
    ap.add_argument("--no-checkpointing", action="store_true", help="keep every block's activations in backward")
    ap.add_argument("--sequential", action="store_true")
    ap.add_argument("--decode-batch-sizes", type=int, nargs="+", default=[1, 16])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--als-backends", nargs="+", default=None,
                    help="backends for the bandwidth measurement (default: triton and torch on CUDA, native and "
                         "torch on CPU)")
    ap.add_argument("--skip-compress", action="store_true", help="only the ALS and speed figures")
    ap.add_argument("--output", default=None, help="JSON file name under benchmarks/results/ (or a path)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    if not 0 < args.retention < 1:
        ap.error(f"--retention must lie strictly between 0 and 1, got {args.retention}")
    for name in ("num_samples", "seq_len", "batch_size", "repeats"):
        if getattr(args, name) < (2 if name == "seq_len" else 1):
            ap.error(f"--{name.replace('_', '-')} must be >= {2 if name == 'seq_len' else 1}")
    if args.stats_memory_gb <= 0 or any(b < 1 for b in args.decode_batch_sizes):
        ap.error("--stats-memory-gb must be > 0 and --decode-batch-sizes >= 1")
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda but no GPU is visible; use --device cpu (and --shape tiny)")
    dtype = resolve_dtype(args.dtype)
    name = device_name(device)
    peak = PEAK_BANDWIDTH.get(name.upper())
    backends = args.als_backends or (["triton", "torch"] if device.type == "cuda" else ["native", "torch"])
    result: dict = {"settings": vars(args), "environment": environment(), "device": name,
                    "peak_bandwidth_bytes_per_s": peak}

    t0 = time.perf_counter()
    model = build(args.shape, dtype, device, args.seed)
    sync(device)
    model_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    result["model"] = {"shape": SHAPES[args.shape], "bytes": model_bytes, "build_seconds": time.perf_counter() - t0}
    print(f"{args.shape} model: {model_bytes / 2**30:.2f} GiB of {args.dtype} weights on {name}", flush=True)

    cfg = SHAPES[args.shape]
    h, f = cfg["hidden_size"], cfg["intermediate_size"]
    result["als"] = als_bandwidth([(h, h), (f, h)], args.retention, device, backends, peak)

    result["dense"] = speed(model, args.decode_batch_sizes, args.repeats)
    print(f"dense: decode {result['dense']['decode_s_per_token']}, prefill "
          f"{result['dense']['prefill_tokens_per_s']:.0f} tok/s", flush=True)
    if not args.skip_compress:
        windows = torch.randint(0, cfg["vocab_size"], (args.num_samples, args.seq_len),
                                generator=torch.Generator().manual_seed(args.seed))
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
        t0 = time.perf_counter()
        info = air_ft.compress(model, None, method=args.method, retention=args.retention, windows=windows,
                               batch_size=args.batch_size, stats_memory_gb=args.stats_memory_gb,
                               checkpointing=not args.no_checkpointing, sequential=args.sequential, cache=False,
                               progress=True)
        sync(device)
        total = time.perf_counter() - t0
        peak_dev = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
        result["compress"] = {
            "seconds": total, "calibration_seconds": info.calibration_seconds,
            "compression_seconds": info.compression_seconds, "tokens": int(windows.numel()),
            "retention_actual": info.retention_actual, "stream": info.stream,
            "peak_device_bytes": peak_dev,
            "peak_device_over_model_bytes": (peak_dev - model_bytes) if peak_dev is not None else None,
            "peak_host_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}
        print(f"calibration + {args.method} at {args.retention}: {total:.0f} s (calibration "
              f"{info.calibration_seconds:.0f} s, factoring {info.compression_seconds:.0f} s), peak device "
              + (f"{peak_dev / 2**30:.1f} GiB (model {model_bytes / 2**30:.1f} GiB)" if peak_dev else "n/a")
              + f", peak host {result['compress']['peak_host_rss_bytes'] / 2**30:.1f} GiB", flush=True)
        result["factored"] = speed(model, args.decode_batch_sizes, args.repeats)
        fuse_shared_inputs(model)
        result["fused"] = speed(model, args.decode_batch_sizes, args.repeats)
        ratios = {}
        for variant in ("factored", "fused"):
            d, v = result["dense"], result[variant]
            ratios[variant] = {f"decode_b{b}": v["decode_s_per_token"][b] / d["decode_s_per_token"][b]
                               for b in d["decode_s_per_token"]}
            ratios[variant]["prefill_speed"] = v["prefill_tokens_per_s"] / d["prefill_tokens_per_s"]
        result["ratios_to_dense"] = ratios
        print("latency ratios to dense (below 1 is faster; prefill_speed above 1 is faster): "
              + "; ".join(f"{k}: " + ", ".join(f"{m} {x:.2f}" for m, x in r.items()) for k, r in ratios.items()))
    output = args.output or f"scale_{name}.json"
    path = write_json(output, result) if "/" not in output else _write(output, result)
    print(f"wrote {path}")


def _write(path: str, obj: dict):
    import json
    from pathlib import Path

    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(json.dumps(obj, indent=2, default=str))
    return p


if __name__ == "__main__":
    main()
