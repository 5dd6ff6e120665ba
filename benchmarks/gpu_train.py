"""GPU training throughput and peak memory: factored + LoRA against dense + LoRA at the same LoRA rank.

    python benchmarks/gpu_train.py --shape 1b                                             # single GPU, bf16
    accelerate launch --config_file accelerate_configs/single_gpu.yaml benchmarks/gpu_train.py --shape 7b
    accelerate launch --config_file accelerate_configs/deepspeed_zero2.yaml benchmarks/gpu_train.py --shape 1b

A LLaMA-shaped model with random weights (Llama-3.2-1B or Llama-2-7B dimensions; no download) is trained with the
product's own trainer (:func:`air_ft.train.build_trainer`, TRL SFTTrainer, bf16) on random tokens, once dense with
LoRA on every decoder linear and once factored at ``--retention`` with LoRA on the factors (``factors`` placement)
and on each factored layer (``layer``), same rank. Factors are random too: the throughput and memory of a factored
layer do not depend on its values. Reported per variant: tokens/s over the timed steps (after ``--warmup`` steps),
peak allocated GPU memory, trainable and total parameters. Writes benchmarks/results/gpu_train_<shape>_<mode>.json.

Needs a CUDA GPU; without one it stops with a message (it has not been run in the CPU-only development sandbox).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from common import RESULTS, environment, save_figure, subplots, write_json
from transformers import TrainerCallback

SHAPES = {  # hidden, intermediate, layers, heads, kv heads, vocab
    "1b": (2048, 8192, 16, 32, 8, 128256),
    "3b": (3072, 8192, 28, 24, 8, 128256),
    "7b": (4096, 11008, 32, 32, 32, 32000),
    "tiny": (64, 128, 2, 4, 2, 256),  # CPU smoke test of the script itself (--cpu-smoke-test)
}
CUDA = torch.cuda.is_available()


def _sync() -> None:
    if CUDA:
        torch.cuda.synchronize()


def _tokenizer():
    """A two-token tokenizer: the data are random ids, the trainer only needs pad/eos ids for collation."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.WordLevel({"<pad>": 0, "<eos>": 1}, unk_token="<pad>"))
    return PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", eos_token="<eos>")


def build_model(shape: str, factored: bool, retention: float, dtype: torch.dtype, device: str,
                multiple: int = 1):
    """Random-weight LLaMA; with ``factored`` every decoder linear becomes a LowRankLinear at the engine's ranks."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from air_ft.compress import plan_ranks
    from air_ft.modeling import factored_skeleton, find_targets

    hidden, inter, layers, heads, kv, vocab = SHAPES[shape]
    cfg = LlamaConfig(hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=kv, vocab_size=vocab,
                      max_position_embeddings=4096)
    with torch.device(device):
        model = LlamaForCausalLM(cfg).to(dtype)
    if factored:
        factored_skeleton(model, plan_ranks(find_targets(model), retention, multiple), dtype, device)
    return model


class Timer(TrainerCallback):
    """Wall time and peak memory from the end of ``warmup`` steps to the end of training."""

    def __init__(self, warmup: int) -> None:
        self.warmup, self.t0, self.seconds, self.timed_steps = warmup, 0.0, 0.0, 0

    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step == self.warmup:
            _sync()
            if CUDA:
                torch.cuda.reset_peak_memory_stats()
            self.t0 = time.perf_counter()

    def on_train_end(self, args, state, control, **kwargs):
        _sync()
        self.seconds, self.timed_steps = time.perf_counter() - self.t0, state.global_step - self.warmup


def run_variant(args, placement: str | None) -> dict:
    from datasets import Dataset

    from air_ft.config import TrainConfig
    from air_ft.lora import apply_lora, lora_budget
    from air_ft.train import build_trainer

    factored = placement is not None
    torch.manual_seed(0)
    dtype, device = (torch.bfloat16, "cuda") if CUDA else (torch.float32, "cpu")
    model = build_model(args.shape, factored, args.retention, dtype, device, args.rank_multiple)
    weights = torch.cuda.memory_allocated() / 2**30 if CUDA else None
    if factored:
        peft_model = apply_lora(model, placement, args.lora_rank, 2.0 * args.lora_rank)
    else:
        from peft import LoraConfig, get_peft_model

        peft_model = get_peft_model(model, LoraConfig(
            r=args.lora_rank, lora_alpha=2 * args.lora_rank, task_type="CAUSAL_LM",
            target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]))
    budget = lora_budget(peft_model) if factored else {
        "trainable_params": sum(p.numel() for p in peft_model.parameters() if p.requires_grad),
        "total_params": sum(p.numel() for p in peft_model.parameters())}
    vocab = SHAPES[args.shape][5]
    steps = args.warmup + args.steps
    ids = torch.randint(0, vocab, (steps * args.batch_size, args.seq_len), generator=torch.Generator().manual_seed(0))
    data = Dataset.from_dict({"input_ids": ids.tolist()})
    cfg = TrainConfig(max_steps=steps, learning_rate=1e-4, batch_size=args.batch_size, seq_len=args.seq_len,
                      bf16=CUDA, gradient_checkpointing=args.gradient_checkpointing, eval_steps=0, save_steps=0,
                      logging_steps=max(1, steps // 4), progress=False)
    timer = Timer(args.warmup)
    trainer = build_trainer(peft_model, _tokenizer(), data, None, cfg, f"/tmp/air_ft_gpu_train/{args.shape}",
                            [timer])
    trainer.train()
    world = trainer.accelerator.num_processes
    tokens = timer.timed_steps * args.batch_size * args.seq_len * world
    peak = torch.cuda.max_memory_allocated() / 2**30 if CUDA else None
    return {"tokens_per_s": tokens / timer.seconds, "peak_memory_gib": peak, "weights_gib": weights,
            "processes": world, "timed_steps": timer.timed_steps, **budget}


def plot(path: Path) -> Path:
    """Speed and peak memory of each factored variant relative to dense, one bar per results file (shape, launcher,
    rank multiple), from every ``gpu_train_*.json`` in benchmarks/results."""
    files = sorted(RESULTS.glob("gpu_train_*.json"))
    if not files:
        raise SystemExit("no gpu_train_*.json in benchmarks/results: run the benchmark on a GPU first")
    fig, axes = subplots(1, 2, 6.5, 3.8)
    runs = [(f.stem.removeprefix("gpu_train_"), json.loads(f.read_text())["results"]) for f in files]
    variants = [v for v in runs[0][1] if v != "dense+lora"]
    width = 0.8 / len(variants)
    for ax, key, title in ((axes[0][0], "speed_vs_dense", "training tokens/s vs dense + LoRA"),
                           (axes[0][1], "peak_memory_vs_dense", "peak GPU memory vs dense + LoRA")):
        for j, variant in enumerate(variants):
            xs = [i + (j - (len(variants) - 1) / 2) * width for i in range(len(runs))]
            ax.bar(xs, [res[variant][key] for _, res in runs], width, label=variant)
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.set_xticks(range(len(runs)), [name for name, _ in runs], rotation=30, ha="right", fontsize=8)
        ax.set_title(title, fontsize=10)
        ax.set_ylim(0, 1.45)
        ax.legend(fontsize=8, loc="upper left", ncol=2)
    return save_figure(fig, path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", choices=sorted(SHAPES), default="1b")
    ap.add_argument("--retention", type=float, default=0.6)
    ap.add_argument("--placements", nargs="+", choices=["factors", "layer"], default=["factors", "layer"])
    ap.add_argument("--rank-multiple", type=int, default=8,
                    help="round factored ranks down to this multiple (compress.rank_multiple); 1: the exact ranks")
    ap.add_argument("--lora-rank", type=int, default=16)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=60,
                    help="timed steps (with 20, the 1B ratios moved by up to 0.25 between runs)")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--gradient-checkpointing", action="store_true")
    ap.add_argument("--variant", choices=["dense", "factors", "layer"], help=argparse.SUPPRESS)
    ap.add_argument("--result-file", help=argparse.SUPPRESS)
    ap.add_argument("--plot-only", action="store_true",
                    help="redraw benchmarks/results/gpu_train.png from the results files, no GPU needed")
    ap.add_argument("--cpu-smoke-test", action="store_true", help="run --shape tiny on CPU to check the script only")
    args = ap.parse_args()
    for flag, low in (("rank_multiple", 1), ("lora_rank", 1), ("batch_size", 1), ("seq_len", 2), ("steps", 1),
                      ("warmup", 0)):
        if getattr(args, flag) < low:
            ap.error(f"--{flag.replace('_', '-')} must be an integer >= {low}, got {getattr(args, flag)}")
    if not 0.0 < args.retention < 1.0:
        ap.error(f"--retention must lie strictly between 0 and 1, got {args.retention}")
    if args.plot_only:
        print(f"wrote {plot(RESULTS / 'gpu_train.png')}")
        return
    if args.cpu_smoke_test:
        args.shape, args.seq_len, args.steps, args.warmup = "tiny", 32, 2, 1
    elif not CUDA:
        sys.exit("gpu_train.py needs a CUDA GPU (bf16 training throughput); none is visible here. Run it on a GPU "
                 "machine, e.g. `python benchmarks/gpu_train.py --shape 1b`.")
    if CUDA and not torch.cuda.is_bf16_supported():
        sys.exit("this GPU does not support bf16; the benchmark measures bf16 training (Ampere or newer)")

    if args.variant is not None:  # one variant in this process (the orchestrator below starts it)
        from accelerate import PartialState

        state = PartialState()
        res = run_variant(args, None if args.variant == "dense" else args.variant)
        res["distributed"] = {"NO": "single"}.get(state.distributed_type.value, state.distributed_type.value.lower())
        if state.is_main_process:
            Path(args.result_file).write_text(json.dumps(res))
        state.wait_for_everyone()
        return
    # Each variant runs in a fresh process, so that none inherits another's allocations, caches or DeepSpeed engine
    # (in one process the later variants' peaks included the earlier ones' leftovers). Under `accelerate launch`
    # every rank starts its child with the launcher's environment, and the children form the process group.
    main_rank = int(os.environ.get("RANK", "0")) == 0
    report = {"args": vars(args), "environment": environment(),
              "device": torch.cuda.get_device_name() if CUDA else "cpu (smoke test, not a measurement)",
              "results": {}}
    dense = None
    with tempfile.TemporaryDirectory() as tmp:
        for variant in ("dense", *args.placements):
            result_file = Path(tmp) / f"{variant}.json"
            proc = subprocess.run([sys.executable, __file__, *sys.argv[1:], "--variant", variant,
                                   "--result-file", str(result_file)])
            if proc.returncode:
                sys.exit(f"the {variant} variant failed (exit {proc.returncode}); its output is above")
            if not main_rank:
                continue
            res = json.loads(result_file.read_text())
            report["distributed"] = res.pop("distributed")
            label = "dense+lora" if variant == "dense" else f"factored+lora[{variant}]"
            report["results"][label] = res
            if variant == "dense":
                dense = res
            else:  # the ratios the benchmark exists for, measured in this one run
                res["speed_vs_dense"] = res["tokens_per_s"] / dense["tokens_per_s"]
                if CUDA:
                    res["peak_memory_vs_dense"] = res["peak_memory_gib"] / dense["peak_memory_gib"]
    if not main_rank:
        return
    for label, res in report["results"].items():
        peak = f"{res['peak_memory_gib']:6.2f} GiB" if res["peak_memory_gib"] is not None else "n/a"
        ratio = f"  x{res['speed_vs_dense']:.2f} speed" if "speed_vs_dense" in res else ""
        ratio += f" x{res['peak_memory_vs_dense']:.2f} memory" if "peak_memory_vs_dense" in res else ""
        print(f"{label:<28} {res['tokens_per_s']:>10.0f} tokens/s  peak {peak}  "
              f"trainable {res['trainable_params']:,} of {res['total_params']:,}{ratio}", flush=True)
    if not args.cpu_smoke_test:
        suffix = "" if args.rank_multiple == 8 else f"_multiple{args.rank_multiple}"
        name = f"gpu_train_{args.shape}_{report['distributed']}{suffix}.json"
        print(f"wrote {write_json(name, report)} and {plot(RESULTS / 'gpu_train.png')}")


if __name__ == "__main__":
    main()
