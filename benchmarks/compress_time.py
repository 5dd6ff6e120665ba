"""Compression time of the default against SVD-LLM(W) and AIR as published, in one run, nothing cached.

    python benchmarks/compress_time.py --threads 2                 # 0.6, the default's 64 windows x 512 tokens
    python benchmarks/compress_time.py --retention 0.4 --num-samples 32

Each method compresses a fresh copy of SmolLM2-135M-Instruct from the same calibration windows with a cold
statistics cache (``--cache cold``: an empty ``AIR_FT_CACHE`` folder of its own, what a first run costs; the default
reads the dense model's statistics of its rank-allocation pass back from it instead of computing them twice) or
none (``--cache off``: ``cache: false``), one after the other in this process: SVD-LLM(W) and AIR with the
paper's protocol (``sequential: false``: every statistic from the dense model) and the library's default,
``air_ft.compress(model, tok, texts, retention=r)`` with nothing else given. Calibration (forward and backward
passes, the spectra of global allocation, block refinement) and factoring are reported apart, with their sum and
its ratio to SVD-LLM(W)'s. Writes benchmarks/results/compress_time_smollm2_cpu.json.
"""

from __future__ import annotations

import argparse
import copy
import os
import tempfile
import time

from common import MODEL, check_retentions, environment, load_split, set_threads, write_json


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--retention", type=float, default=0.6)
    ap.add_argument("--num-samples", type=int, default=None,
                    help="calibration windows (default: the library's, compress.num_samples)")
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--cache", choices=["cold", "off"], default="cold")
    ap.add_argument("--runs", nargs="+", choices=["svdllm", "air", "default", "influence16"],
                    default=["svdllm", "air", "default"],
                    help="which runs (the ratio needs svdllm); influence16: the default with influence_samples: 16, "
                         "its backward on the first 16 windows (a lever measured on validation, not the default)")
    ap.add_argument("--output", default="compress_time_smollm2_cpu.json")
    args = ap.parse_args()
    check_retentions(ap, [args.retention])
    if args.num_samples is not None and args.num_samples < 1 or args.seq_len < 2:
        ap.error("--num-samples must be >= 1 and --seq-len >= 2")
    if "svdllm" not in args.runs:
        ap.error("--runs must include svdllm (the reference of the ratio)")
    set_threads(args.threads)
    import air_ft
    from air_ft.config import CompressConfig

    args.num_samples = args.num_samples or CompressConfig().num_samples

    model, tok = air_ft.load_model(MODEL)
    texts = load_split("calibration")
    runs = {"svdllm": ("SVD-LLM(W), paper protocol", {"method": "svdllm", "sequential": False}),
            "air": ("AIR, paper protocol", {"method": "air", "sequential": False}),
            "default": (f"default ({CompressConfig().method})", {}),
            "influence16": (f"default ({CompressConfig().method}), influence_samples 16", {"influence_samples": 16})}
    rows, before = [], os.environ.get("AIR_FT_CACHE")
    for label, options in (runs[r] for r in runs if r in args.runs):  # SVD-LLM(W) first: the reference
        work = copy.deepcopy(model)
        with tempfile.TemporaryDirectory() as cold:
            os.environ["AIR_FT_CACHE"] = cold  # the model and texts are loaded: only statistics land here
            t0 = time.perf_counter()
            info = air_ft.compress(work, tok, texts, retention=args.retention, num_samples=args.num_samples,
                                   seq_len=args.seq_len, cache=args.cache == "cold", progress=False, **options)
            wall = time.perf_counter() - t0
        if before is None:
            del os.environ["AIR_FT_CACHE"]
        else:
            os.environ["AIR_FT_CACHE"] = before
        stream = info.stream or {}
        rows.append({"run": label, "options": options, "config": info.config, "wall_seconds": wall,
                     "calibration_seconds": info.calibration_seconds,
                     "compression_seconds": info.compression_seconds, "calibration_tokens": info.calibration_tokens,
                     "retention_actual": info.retention_actual,
                     # parts of calibration_seconds: the allocation pass (its own forward and backward of the
                     # dense model) and block refinement
                     "allocation_seconds": info.extra.get("allocation_seconds", 0.0),
                     "refine_seconds": stream.get("refine", {}).get("seconds", 0.0),
                     "influence_passes": stream.get("influence_passes"),
                     "influence_tokens": stream.get("influence_tokens")})
        print(f"{label}: {wall:.0f} s (calibration {info.calibration_seconds:.0f} s, of which allocation "
              f"{rows[-1]['allocation_seconds']:.0f} s and refinement {rows[-1]['refine_seconds']:.0f} s; "
              f"factoring {info.compression_seconds:.0f} s)", flush=True)
        del work
    ref = rows[0]["wall_seconds"]
    for r in rows:
        r["ratio_to_svdllm"] = r["wall_seconds"] / ref
    print("\n| run | calibration s | of which allocation s | of which refinement s | factoring s | total s | "
          "ratio to SVD-LLM(W) |\n|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['run']} | {r['calibration_seconds']:.0f} | {r['allocation_seconds']:.0f} | "
              f"{r['refine_seconds']:.0f} | {r['compression_seconds']:.0f} | {r['wall_seconds']:.0f} | "
              f"{r['ratio_to_svdllm']:.2f} |")
    path = write_json(args.output, {"retention": args.retention, "num_samples": args.num_samples, "cache": args.cache,
                                    "seq_len": args.seq_len, "rows": rows, "environment": environment()})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
