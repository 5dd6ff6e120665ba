"""Peak memory of compression as the model gets deeper: it should not grow by the factors' bytes.

Random LLaMA models (hidden 1024, intermediate 2816, 16 heads) of 4 and 8 decoder layers are compressed with
SVD-LLM(W) at retention 0.6 (no disk cache), each in its own process with ``MALLOC_MMAP_THRESHOLD_=65536`` so that
large allocations go through mmap and the resident set is live memory. A 1 ms sampler records the resident set
during ``air_ft.compress``; the figure is its peak above the resident set just before the call. If every dense
weight lived until the end beside its factors, the peak would grow by the factors' bytes from 4 to 8 layers.

    python benchmarks/compress_memory.py                 # -> benchmarks/results/compress_memory_cpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"

CHILD = r"""
import json, sys, threading, time
import psutil, torch
from transformers import LlamaConfig, LlamaForCausalLM
import air_ft

layers = int(sys.argv[1])
torch.manual_seed(0)
cfg = LlamaConfig(vocab_size=512, hidden_size=1024, intermediate_size=2816, num_hidden_layers=layers,
                  num_attention_heads=16, num_key_value_heads=16, max_position_embeddings=256)
model = LlamaForCausalLM(cfg).eval()
windows = torch.randint(0, 512, (8, 128))
proc, peak, stop = psutil.Process(), [0], threading.Event()
def sample():
    while not stop.is_set():
        peak[0] = max(peak[0], proc.memory_info().rss)
        time.sleep(0.001)
decoder = sum(p.numel() * 4 for n, p in model.named_parameters() if ".layers." in n and p.dim() == 2)
base = proc.memory_info().rss
thread = threading.Thread(target=sample, daemon=True)
thread.start()
result = air_ft.compress(model, None, windows=windows, method="svdllm", retention=0.6, batch_size=4,
                         cache=False, progress=False)
stop.set(); thread.join()
factors = sum(p.numel() * 4 for n, p in model.named_parameters() if "factor_" in n and p.dim() == 2)
print(json.dumps({"layers": layers, "decoder_weight_bytes": decoder, "factor_bytes": factors,
                  "peak_above_start_bytes": peak[0] - base}))
"""


def measure(layers: int) -> dict:
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-c", CHILD, str(layers)], capture_output=True, text=True, env=env,
                         check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, nargs="+", default=[4, 8])
    ap.add_argument("--output", default="compress_memory_cpu.json")
    args = ap.parse_args()
    rows = [measure(n) for n in args.layers]
    mib = 2 ** 20
    print(f"{'layers':>6} {'decoder MiB':>12} {'factors MiB':>12} {'peak above start MiB':>21}")
    for r in rows:
        print(f"{r['layers']:>6} {r['decoder_weight_bytes'] / mib:>12.1f} {r['factor_bytes'] / mib:>12.1f} "
              f"{r['peak_above_start_bytes'] / mib:>21.1f}")
    growth = {"decoder_mib": (rows[-1]["decoder_weight_bytes"] - rows[0]["decoder_weight_bytes"]) / mib,
              "factors_mib": (rows[-1]["factor_bytes"] - rows[0]["factor_bytes"]) / mib,
              "peak_mib": (rows[-1]["peak_above_start_bytes"] - rows[0]["peak_above_start_bytes"]) / mib}
    print(f"from {rows[0]['layers']} to {rows[-1]['layers']} layers: decoder +{growth['decoder_mib']:.1f} MiB, "
          f"factors +{growth['factors_mib']:.1f} MiB, compression peak +{growth['peak_mib']:.1f} MiB")
    from air_ft.files import write_json

    write_json(RESULTS / args.output, {"rows": rows, "growth": growth, "command": "python " + " ".join(sys.argv)})
    print(f"wrote {RESULTS / args.output}")


if __name__ == "__main__":
    main()
