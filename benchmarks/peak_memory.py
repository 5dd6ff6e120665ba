"""Two measures of a forward's peak memory on CPU, on the study's rank maps: the resident set and glibc's heap bytes
in use, each with glibc's default allocator and with a fixed mmap threshold (every large block mapped on allocation
and unmapped on free, so that freed memory cannot stay resident).

    python benchmarks/peak_memory.py        # -> benchmarks/results/peak_memory_measures_cpu.json

SmolLM2-135M-Instruct, dense and, for each compress stage marker given (default: the study's
SVD-LLM(W) and ACIP-style at 0.6), truncated SVDs at its ranks (the models of ``efficiency.py --rank-maps``).
Each allocator setting runs in its own process (glibc reads ``MALLOC_MMAP_THRESHOLD_`` at start); one warm-up
forward, then ``--repeats`` forwards of ``--tokens`` tokens per measure, medians reported.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

from common import ROOT, environment, set_threads, write_json

STAGES = ROOT / "benchmarks" / "results" / "study_smollm2" / "stages" / "compress"
DEFAULT = [str(STAGES / f"{m}-r0.60" / "stage.json") for m in ("svdllm", "acip")]
SETTINGS = {"default allocator": {}, "MALLOC_MMAP_THRESHOLD_=65536": {"MALLOC_MMAP_THRESHOLD_": "65536"}}


def measure(paths: list[str], tokens: int, repeats: int) -> dict:
    """Median peak (MiB) per model and measure, in this process."""
    import copy

    import torch
    from efficiency import build, read_ranks

    from air_ft.efficiency import factored_at, peak_forward_bytes

    dense, _ = build("smollm2", "float32", "cpu")
    ids = torch.randint(0, dense.config.vocab_size, (1, tokens), generator=torch.Generator().manual_seed(0))
    out = {}
    for name, ranks in [("dense", {})] + [(Path(p).parent.name, read_ranks(p)) for p in paths]:
        model = factored_at(copy.deepcopy(dense), ranks).eval()
        with torch.no_grad():
            model(input_ids=ids, use_cache=False)  # warm-up
            out[name] = {m: statistics.median(peak_forward_bytes(model, ids, m)[0] for _ in range(repeats)) / 2**20
                         for m in ("rss", "heap")}
        del model
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rank-maps", nargs="+", default=DEFAULT, help="compress stage.json or air_ft.json files")
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--output", default="peak_memory_measures_cpu.json")
    args = ap.parse_args()
    if min(args.tokens, args.repeats) < 1:
        ap.error("--tokens and --repeats must be >= 1")
    missing = [p for p in args.rank_maps if not Path(p).is_file()]
    if missing:
        ap.error(f"--rank-maps: no such file {missing[0]}")
    from efficiency import read_ranks

    try:
        [read_ranks(p) for p in args.rank_maps]
    except ValueError as err:
        ap.error(f"--rank-maps: {err}")
    args.rank_maps = [str(Path(p).resolve()) for p in args.rank_maps]  # the children run in benchmarks/
    set_threads(args.threads)
    if args.child:
        print(json.dumps(measure(args.rank_maps, args.tokens, args.repeats)))
        return
    results = {}
    for label, env in SETTINGS.items():
        proc = subprocess.run([sys.executable, __file__, "--child", "--threads", str(args.threads), "--tokens",
                               str(args.tokens), "--repeats", str(args.repeats), "--rank-maps", *args.rank_maps],
                              env={**os.environ, **env}, capture_output=True, text=True, cwd=Path(__file__).parent)
        if proc.returncode:
            raise SystemExit(f"the {label} run failed: {proc.stderr.strip().splitlines()[-1]}")
        results[label] = json.loads(proc.stdout.strip().splitlines()[-1])
    short = {"default allocator": "default", "MALLOC_MMAP_THRESHOLD_=65536": "fixed mmap"}
    print(f"{'shapes':<14}" + "".join(f"{f'{m} ({short[label]})':>20}" for label in SETTINGS for m in ("rss", "heap"))
          + "   (MiB above the level before the forward, medians)")
    for name in results["default allocator"]:
        cells = [results[label][name][m] for label in SETTINGS for m in ("rss", "heap")]
        print(f"{name:<14}" + "".join(f"{c:20.2f}" for c in cells))
    out = write_json(args.output, {"peak_mib": results, "settings": vars(args), "environment": environment()})
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
