"""GPU-only checks, skipped without CUDA (CI has none; run them on a GPU machine with ``pytest tests/test_gpu.py``).

- ``air-ft train`` trains in bf16 on one GPU and its merged checkpoint reproduces the adapter model;
- the shipped accelerate configs (single GPU, DeepSpeed ZeRO-2, ZeRO-3, FSDP) launch ``air-ft train`` end to end on one
  process: the adapter file is complete (ZeRO-3 saves empty shards unless told otherwise), the adapters trained, and
  the merged factored checkpoint equals the adapter model rebuilt from the saved files;
- the Triton ALS kernels match the torch reference sweep (compiled, and replayed from their CUDA graph);
- streamed AIR compression of a bf16 model with activation checkpointing, and fused V factors, run on the GPU.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import air_ft
from air_ft.lora import apply_lora
from air_ft.pipeline.commands import train as run_train
from air_ft.train import read_adapter

from .test_train import compressed_dir, make_text, text_file, tiny_recipe  # noqa: F401 (fixtures)

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
ROOT = Path(__file__).resolve().parents[1]


def _check_run(run: Path) -> None:
    """The saved adapters trained, and the merged checkpoint equals the adapter model rebuilt on CPU in fp32."""
    from peft import set_peft_model_state_dict

    state = read_adapter(run / "adapter")  # raises on empty (ZeRO-3 shard) tensors
    lora_b = [v for k, v in state.items() if "lora_B" in k]
    assert lora_b and all(torch.isfinite(v).all() for v in state.values())
    assert max(v.abs().max().item() for v in lora_b) > 0  # B starts at zero: training moved it
    meta = json.loads((run / "adapter" / "air_ft_adapter.json").read_text())
    base, tok = air_ft.load_compressed(meta["base"])
    peft_model = apply_lora(base, meta["placement"], meta["rank"], meta["alpha"], meta["dropout"], meta["targets"])
    set_peft_model_state_dict(peft_model, {k: v.float() for k, v in state.items()})
    merged, _ = air_ft.load_compressed(run / "merged")
    x = torch.tensor([tok(make_text(40, 9), add_special_tokens=False).input_ids])
    with torch.no_grad():
        torch.testing.assert_close(merged.float()(input_ids=x).logits, peft_model(input_ids=x).logits,
                                   atol=1e-4, rtol=1e-4)
    log = [json.loads(line) for line in (run / "train_log.jsonl").read_text().splitlines()]
    losses = [e["loss"] for e in log if "loss" in e]
    assert losses and all(torch.isfinite(torch.tensor(losses)))


def test_bf16_training_on_one_gpu(tmp_path, compressed_dir, text_file):  # noqa: F811
    from air_ft.train import use_bf16

    assert use_bf16(None), "bf16 should be on by default on a GPU that supports it"
    recipe = tiny_recipe(tmp_path, compressed_dir, text_file, "train.max_steps=6", "lora.placement=layer")
    summary = run_train(recipe)
    assert summary.global_step == 6
    _check_run(tmp_path / "run")


@pytest.mark.parametrize("config", ["single_gpu", "deepspeed_zero2", "deepspeed_zero3", "fsdp"])
def test_accelerate_launch_on_one_gpu(tmp_path, compressed_dir, text_file, config):  # noqa: F811
    if config.startswith("deepspeed"):
        pytest.importorskip("deepspeed")
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           "TOKENIZERS_PARALLELISM": "false"}
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
           str(ROOT / "accelerate_configs" / f"{config}.yaml"), "--num_processes", "1", "-m", "air_ft", "train",
           "--recipe", str(ROOT / "recipes" / "tiny" / "svd-lora.yaml"), f"output_dir={out}",
           f"train.compressed_path={compressed_dir}", f"train.data=[{{source: {text_file}}}]",
           f"train.eval_data=[{{source: {text_file}, start: 0.9}}]", "train.max_steps=4", "train.eval_steps=2"]
    proc = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    if proc.returncode:
        pytest.fail(f"{config} launch failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-6000:]}", pytrace=False)
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["global_step"] == 4
    _check_run(out)


def test_triton_als_on_the_gpu_matches_the_reference_and_descends():
    """The compiled kernels (not the interpreter), with and without the recorded CUDA graph, against torch."""
    pytest.importorskip("triton")
    from air_ft import gpu_als
    from air_ft.linalg import als_sweep, triton_available

    assert triton_available("cuda"), gpu_als.error()
    g = torch.Generator(device="cuda").manual_seed(0)
    for m, n, k in [(300, 257, 40), (513, 128, 9), (300, 257, 40)]:  # the repeat replays the recorded graph
        w = torch.randn(m, n, device="cuda", generator=g)
        c = 1.0 + 3 * torch.rand(m, n, device="cuda", generator=g)
        u, s, vh = torch.linalg.svd(w, full_matrices=False)
        ref = als_sweep(w, c, u[:, :k], s[:k], vh[:k], sweeps=2, backend="torch")
        got = als_sweep(w, c, u[:, :k], s[:k], vh[:k], sweeps=2, backend="triton")
        torch.testing.assert_close(got.sigma, ref.sigma, rtol=1e-3, atol=1e-3)
        assert got.objective[-1] <= got.objective[0] and got.objective[-1] == pytest.approx(ref.objective[-1],
                                                                                             rel=1e-4)


def test_streamed_compression_on_the_gpu_in_bf16(tokenizer, text):
    """AIR on a bf16 model on the GPU, with activation checkpointing and one block per influence pass: the
    statistics stay float64/float32 on the device, the factored model runs, and fusing changes no output."""
    import copy

    from air_ft.modeling import fuse_shared_inputs

    from .conftest import tiny_llama

    model = tiny_llama(vocab_size=len(tokenizer), layers=3).to("cuda", torch.bfloat16)
    info = air_ft.compress(model, tokenizer, [text], method="air", retention=0.5, num_samples=8, seq_len=32,
                           batch_size=2, checkpointing=True, stats_memory_gb=1e-6, cache=False, progress=False)
    assert info["stream"]["influence_passes"] == 3 and info["stream"]["peak_device_bytes"] > 0
    ids = torch.randint(0, len(tokenizer), (2, 16), device="cuda")
    fused = copy.deepcopy(model)
    fuse_shared_inputs(fused)
    with torch.no_grad():
        out = model(ids).logits
        assert torch.isfinite(out).all()
        torch.testing.assert_close(fused(ids).logits, out, rtol=2e-2, atol=2e-2)
