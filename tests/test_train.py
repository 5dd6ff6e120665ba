"""The training stage on a tiny in-process LLaMA: one step leaves the base alone, the loss falls, checkpoints
resume, the merged checkpoint reproduces the adapter model, and ``accelerate launch`` runs end to end."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from transformers import LlamaForCausalLM, PreTrainedTokenizerFast, TrainerCallback

import air_ft
from air_ft.config import RecipeError, load_recipe
from air_ft.lora import apply_lora
from air_ft.pipeline.commands import train as run_train
from air_ft.train import build_trainer, finetune
from air_ft.train_data import text_blocks

from .conftest import tiny_llama

ROOT = Path(__file__).resolve().parents[1]
WORDS = ("the of and to in a is that it was for on as with by he his at from this be which or an are had not but "
         "king queen lord sword castle river city north south east west army ship gold iron wheat wine").split()


def make_tokenizer() -> PreTrainedTokenizerFast:
    """A word-level tokenizer over a fixed vocabulary, built locally (no downloads)."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<pad>": 0, "<unk>": 1, "<eos>": 2, **{w: i + 3 for i, w in enumerate(WORDS)}}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", unk_token="<unk>", eos_token="<eos>")


def make_text(n_words: int, seed: int) -> str:
    """Text with a strong, quickly learnable structure (word i is followed by word i+1 nine times in ten), so the
    loss-falls and distillation tests see progress in a few dozen steps; conftest's text is a looser chain."""
    g = torch.Generator().manual_seed(seed)
    idx, out = 0, []
    for _ in range(n_words):
        idx = (idx + 1) % len(WORDS) if torch.rand(1, generator=g) < 0.9 else int(torch.randint(len(WORDS), (1,),
                                                                                               generator=g))
        out.append(WORDS[idx])
    return " ".join(out)


def make_dense(seed: int = 0):
    """conftest's tiny GQA LLaMA over this module's tokenizer (its own vocabulary: see ``make_text``)."""
    tok = make_tokenizer()
    model = tiny_llama(vocab_size=len(tok), seed=seed).train()
    model.config.pad_token_id, model.config.eos_token_id, model.config.bos_token_id = 0, 2, 2
    return model, tok


def make_compressed(seed: int = 0):
    model, tok = make_dense(seed)
    air_ft.compress(model, tok, None, method="svd", retention=0.6, progress=False)
    return model, tok


@pytest.fixture(scope="module")
def compressed_dir(tmp_path_factory) -> Path:
    model, tok = make_compressed()
    return air_ft.save_compressed(model, tok, tmp_path_factory.mktemp("base") / "svd")


@pytest.fixture(scope="module")
def text_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "train.txt"
    path.write_text(make_text(6000, 0))
    return path


def tiny_recipe(tmp_path: Path, base: Path, text: Path, *overrides: str):
    return load_recipe(str(ROOT / "recipes" / "tiny" / "svd-lora.yaml"),
                       [f"output_dir={tmp_path / 'run'}", f"train.compressed_path={base}",
                        f"train.data=[{{source: {text}}}]", *overrides])


def test_text_blocks_share_sources_equally_and_are_seeded():
    tok = make_tokenizer()
    short, long = make_text(100, 1), make_text(2000, 2)
    blocks = text_blocks(tok, [short, long], seq_len=16, num_blocks=20, seed=0)
    assert blocks.shape == (20, 16)
    short_ids = tok(short, add_special_tokens=False).input_ids
    short_windows = {tuple(short_ids[i:i + 16]) for i in range(0, len(short_ids) - 15, 16)}
    assert all(tuple(b.tolist()) in short_windows for b in blocks[0::2])  # every other block: the short source
    torch.testing.assert_close(blocks, text_blocks(tok, [short, long], 16, 20, seed=0))
    assert not torch.equal(blocks, text_blocks(tok, [short, long], 16, 20, seed=1))


def test_text_blocks_follow_the_weights_interleaved():
    tok = make_tokenizer()
    a, b = make_text(3000, 1), make_text(3000, 2)
    blocks = text_blocks(tok, [a, b], seq_len=16, num_blocks=40, seed=0, weights=[3.0, 1.0])
    a_ids = tok(a, add_special_tokens=False).input_ids
    a_windows = {tuple(a_ids[i:i + 16]) for i in range(0, len(a_ids) - 15, 16)}
    from_a = [tuple(x.tolist()) in a_windows for x in blocks]
    assert sum(from_a) == 30  # exactly three quarters
    assert all(sum(from_a[i:i + 4]) == 3 for i in range(0, 40, 4))  # interleaved, not 30 then 10
    # equal weights are the plain alternation, so runs without weights are unchanged
    torch.testing.assert_close(text_blocks(tok, [a, b], 16, 40, 0, [2.0, 2.0]), text_blocks(tok, [a, b], 16, 40, 0))
    for bad in ([1.0], [1.0, 0.0], [1.0, -1.0]):
        with pytest.raises(ValueError, match="positive weight"):
            text_blocks(tok, [a, b], 16, 40, 0, bad)


def test_one_step_changes_adapters_and_leaves_base_factors_alone(tmp_path):
    model, tok = make_compressed()
    peft_model = apply_lora(model, "factors", rank=4)
    before = {n: p.detach().clone() for n, p in peft_model.named_parameters()}
    from air_ft.config import TrainConfig
    from air_ft.train_data import build_datasets as _datasets

    cfg = TrainConfig(max_steps=1, learning_rate=1e-2, seq_len=32, batch_size=2, warmup_ratio=0.0, save_steps=0,
                      eval_steps=0, logging_steps=1, progress=False)
    train_ds, _ = _datasets(tok, cfg, [make_text(500, 0)], None, 1)
    build_trainer(peft_model, tok, train_ds, None, cfg, tmp_path).train()
    after = dict(peft_model.named_parameters())
    lora_a = [n for n in before if "lora_A" in n]
    base = [n for n in before if "lora_" not in n]
    assert lora_a and any("factor_u.base_layer" in n for n in base)
    assert all(torch.equal(before[n], after[n].detach()) for n in base)
    # lora_B starts at zero, so after one step it moved (lora_A only moves from the second step on)
    assert all(not torch.equal(before[n], after[n].detach()) for n in before if "lora_B" in n)


def test_loss_falls_over_a_few_dozen_steps():
    model, tok = make_compressed()
    tuned, summary = finetune(model, tok, [make_text(4000, 0)], max_steps=24, lora_rank=4, learning_rate=1e-2,
                              seq_len=32, batch_size=4, seed=0, logging_steps=1, progress=False, return_summary=True)
    losses = [e["loss"] for e in summary.log if "loss" in e]
    assert len(losses) == 24
    assert sum(losses[-4:]) / 4 < sum(losses[:4]) / 4 - 0.2
    assert not tuned.training and not any("lora_" in n for n, _ in tuned.named_parameters())


def test_gradient_checkpointing_recomputes_and_gives_the_same_first_steps():
    """Checkpointing recomputes each decoder layer in backward (its MLP runs twice per step, not once) and changes
    memory, not the math: the losses equal those without it."""
    runs, calls = [], []
    for ckpt in (False, True):
        model, tok = make_compressed()
        act = model.model.layers[0].mlp.act_fn
        count = [0]

        def counted(x, forward=act.forward, count=count):  # module hooks are skipped on recompute; forward is not
            count[0] += 1
            return forward(x)

        act.forward = counted
        tuned, summary = finetune(model, tok, [make_text(500, 0)], max_steps=3, lora_rank=4, learning_rate=1e-2,
                                  seq_len=32, batch_size=2, seed=0, logging_steps=1, progress=False,
                                  gradient_checkpointing=ckpt, return_summary=True)
        runs.append([e["loss"] for e in summary.log if "loss" in e])
        calls.append(count[0])
    assert calls == [3, 6]  # one forward per step; with checkpointing, one more in every backward
    assert len(runs[0]) == 3 and runs[0] == pytest.approx(runs[1], rel=1e-4)


def test_distillation_loss_identities():
    from air_ft.train import distillation_loss

    g = torch.Generator().manual_seed(0)
    student, teacher = torch.randn(2, 7, 11, generator=g), 3 * torch.randn(2, 7, 11, generator=g)
    labels = torch.randint(11, (2, 7), generator=g)
    labels[0, :3] = -100  # e.g. a prompt: no loss there
    valid = labels[:, 1:] != -100
    ce_ref = torch.nn.functional.cross_entropy(student[:, :-1][valid], labels[:, 1:][valid], reduction="sum")
    loss, ce, kl, n = distillation_loss(student, teacher, labels, weight=0.0)
    assert int(n) == int(valid.sum()) == 10
    torch.testing.assert_close(loss, ce_ref)
    torch.testing.assert_close(ce, ce_ref)
    kl_ref = torch.nn.functional.kl_div(torch.log_softmax(student[:, :-1][valid], -1),
                                        torch.log_softmax(teacher[:, :-1][valid], -1), log_target=True,
                                        reduction="sum")
    torch.testing.assert_close(kl, kl_ref)
    assert kl > 0
    loss_half, *_ = distillation_loss(student, teacher, labels, weight=0.5, temperature=2.0)
    kl_t2 = distillation_loss(student, teacher, labels, weight=1.0, temperature=2.0)[2]
    torch.testing.assert_close(loss_half, 0.5 * ce_ref + 0.5 * 4.0 * kl_t2)
    # a student that equals its teacher has nothing to learn from it
    torch.testing.assert_close(distillation_loss(teacher, teacher, labels, weight=1.0)[0], torch.tensor(0.0),
                               atol=1e-5, rtol=0)
    # positions without a label do not count
    moved = student.clone()
    moved[0, :2] += 5.0
    torch.testing.assert_close(distillation_loss(moved, teacher, labels, 0.5)[0],
                               distillation_loss(student, teacher, labels, 0.5)[0])


def test_distillation_pulls_the_student_toward_the_dense_teacher():
    teacher, tok = make_dense()
    with torch.no_grad():
        teacher.lm_head.weight.mul_(20.0)  # a confident teacher, so the KL starts far from zero
    student = LlamaForCausalLM(teacher.config)
    student.load_state_dict(teacher.state_dict())
    air_ft.compress(student, tok, None, method="svd", retention=0.6, progress=False)
    text = [make_text(4000, 0)]
    with pytest.raises(RecipeError, match="teacher"):
        finetune(student, tok, text, max_steps=1, seq_len=32, distill=0.5, progress=False)
    frozen = {n: p.detach().clone() for n, p in teacher.named_parameters()}
    tuned, summary = finetune(student, tok, text, max_steps=24, lora_rank=4, learning_rate=1e-2, seq_len=32,
                              batch_size=4, seed=0, logging_steps=1, progress=False, distill=1.0, teacher=teacher,
                              return_summary=True)
    log = [e for e in summary.log if "kl" in e]
    assert len(log) == 24 and all(e["kl"] >= 0 for e in log)
    kl = [e["kl"] for e in log]
    assert sum(kl[-4:]) / 4 < 0.8 * sum(kl[:4]) / 4
    # pure distillation: the optimized loss is the KL itself
    assert abs(log[-1]["loss"] - log[-1]["kl"]) < 1e-3 * max(1.0, log[-1]["kl"])
    assert all(torch.equal(frozen[n], p) for n, p in teacher.named_parameters())


def test_train_stage_distils_from_the_recipe_model(tmp_path, compressed_dir, text_file):
    dense, tok = make_dense()
    dense.save_pretrained(tmp_path / "dense")
    tok.save_pretrained(tmp_path / "dense")
    recipe = tiny_recipe(tmp_path, compressed_dir, text_file, f"model.name_or_path={tmp_path / 'dense'}",
                         "train.distill=0.5", "train.max_steps=3", "train.logging_steps=1", "train.save_steps=0")
    summary = run_train(recipe)
    log = [json.loads(line) for line in (tmp_path / "run" / "train_log.jsonl").read_text().splitlines()]
    steps = [e for e in log if "loss" in e]
    assert len(steps) == 3 and all(e["kl"] > 0 and e["ce"] > 0 for e in steps)
    # half CE, half KL (temperature 1): the logged loss is their mean
    assert all(abs(e["loss"] - 0.5 * (e["ce"] + e["kl"])) < 1e-3 * e["loss"] for e in steps)
    assert Path(summary.merged).is_dir()


def test_train_stage_starts_layer_adapters_at_the_compression_residual(tmp_path, compressed_dir, text_file):
    dense, tok = make_dense()
    dense.save_pretrained(tmp_path / "dense")
    tok.save_pretrained(tmp_path / "dense")
    recipe = tiny_recipe(tmp_path, compressed_dir, text_file, f"model.name_or_path={tmp_path / 'dense'}",
                         "lora.placement=layer", "lora.init=residual", "train.distill=0", "train.max_steps=1",
                         "train.save_steps=0", "compress.num_samples=4", "compress.seq_len=16")
    summary = run_train(recipe)
    init = summary.init
    assert init["layers"] == 14 and 0 <= init["mean_error_after"] < init["mean_error_before"]
    assert json.loads((tmp_path / "run" / "train_summary.json").read_text())["init"] == init


class _Crash(TrainerCallback):
    """Kill the run after ``step`` optimizer steps, as an interruption would."""

    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            raise KeyboardInterrupt("simulated interruption")


def _adapter(run: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(run / "adapter" / "adapter_model.safetensors"))


def test_resume_after_interruption_matches_an_uninterrupted_run(tmp_path, compressed_dir, text_file):
    steps = ["train.max_steps=4", "train.save_steps=2", "train.eval_steps=0"]
    recipe = tiny_recipe(tmp_path, compressed_dir, text_file, *steps)
    with pytest.raises(KeyboardInterrupt):
        run_train(recipe, callbacks=[_Crash(3)])
    assert (tmp_path / "run" / "checkpoints" / "checkpoint-2").is_dir()
    assert not (tmp_path / "run" / "adapter").exists()
    summary = run_train(recipe)
    assert summary.resumed_from.endswith("checkpoint-2") and summary.global_step == 4

    straight = tiny_recipe(tmp_path / "straight", compressed_dir, text_file, *steps)
    run_train(straight)
    resumed, reference = _adapter(tmp_path / "run"), _adapter(tmp_path / "straight" / "run")
    assert resumed.keys() == reference.keys()
    for key in reference:
        torch.testing.assert_close(resumed[key], reference[key], atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("placement", ["factors", "layer"])
def test_merged_checkpoint_reproduces_the_adapter_model(tmp_path, compressed_dir, text_file, placement):
    recipe = tiny_recipe(tmp_path, compressed_dir, text_file, f"lora.placement={placement}", "train.max_steps=3",
                         "train.learning_rate=0.01", "train.eval_steps=0", "train.save_steps=0")
    run_train(recipe)
    run = tmp_path / "run"
    meta = json.loads((run / "adapter" / "air_ft_adapter.json").read_text())
    base, tok = air_ft.load_compressed(meta["base"])
    peft_model = apply_lora(base, placement, meta["rank"], meta["alpha"], meta["dropout"], meta["targets"])
    from peft import set_peft_model_state_dict

    set_peft_model_state_dict(peft_model, _adapter(run))
    merged, _ = air_ft.load_compressed(run / "merged")
    x = torch.tensor([tok(make_text(40, 9), add_special_tokens=False).input_ids])
    with torch.no_grad():
        expected = peft_model(input_ids=x).logits
        with peft_model.disable_adapter():
            untuned = peft_model(input_ids=x).logits
        got = merged(input_ids=x).logits
    assert (expected - untuned).abs().max() > 1e-4  # training changed the model
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    extra = meta["rank"] if placement == "layer" else 0
    ranks = json.loads((run / "merged" / "air_ft.json").read_text())["ranks"]
    base_ranks = json.loads((compressed_dir / "air_ft.json").read_text())["ranks"]
    assert ranks == {k: v + extra for k, v in base_ranks.items()}
    # `air-ft merge` writes the same checkpoint
    from air_ft.cli import main

    assert main(["merge", "--adapter", str(run / "adapter"), "--output", str(tmp_path / "merged2")]) == 0
    remerged, _ = air_ft.load_compressed(tmp_path / "merged2")
    with torch.no_grad():
        torch.testing.assert_close(remerged(input_ids=x).logits, got, atol=0, rtol=0)
    log = [json.loads(line) for line in (run / "train_log.jsonl").read_text().splitlines()]
    assert any("loss" in e for e in log) and (run / "recipe.resolved.yaml").exists()


def test_an_output_tree_moved_whole_still_merges_without_naming_its_base(tmp_path, compressed_dir, text_file,
                                                                         capsys):
    import shutil

    from air_ft.cli import main

    tree = tmp_path / "tree"
    shutil.copytree(compressed_dir, tree / "base")
    recipe = tiny_recipe(tree, tree / "base", text_file, "train.max_steps=2", "train.learning_rate=0.01",
                         "train.eval_steps=0", "train.save_steps=0")
    run_train(recipe)
    meta = json.loads((tree / "run" / "adapter" / "air_ft_adapter.json").read_text())
    assert meta["base"] == str(tree / "base") and meta["base_relative"] == os.path.join("..", "..", "base")
    # what a run ships is safetensors and JSON: no pickle beside the adapter or in the merged checkpoint
    shipped = [p.name for d in ("adapter", "merged") for p in (tree / "run" / d).iterdir()]
    assert "adapter_model.safetensors" in shipped and "training_args.json" in shipped
    assert not [n for n in shipped if n.endswith((".bin", ".pt", ".pkl", ".pth"))]
    moved = tmp_path / "moved"
    tree.rename(moved)  # the recorded absolute path is gone: only the path from the adapter can find the base
    assert main(["merge", "--adapter", str(moved / "run" / "adapter"), "--output", str(tmp_path / "remerged")]) == 0
    a, _ = air_ft.load_compressed(moved / "run" / "merged")
    b, tok = air_ft.load_compressed(tmp_path / "remerged")
    x = torch.tensor([tok(make_text(40, 3), add_special_tokens=False).input_ids])
    with torch.no_grad():
        torch.testing.assert_close(b(input_ids=x).logits, a(input_ids=x).logits, atol=0, rtol=0)
    # with the base gone from both places: one line that says where it looked and what to pass
    shutil.rmtree(moved / "base")
    capsys.readouterr()
    assert main(["merge", "--adapter", str(moved / "run" / "adapter"), "--output", str(tmp_path / "m3")]) == 2
    err = capsys.readouterr().err
    assert "is not at" in err and "--base" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "m3").exists()


def test_instruction_data_puts_the_loss_on_the_completion_only(tmp_path):
    model, tok = make_compressed()
    path = tmp_path / "sft.jsonl"
    rows = [{"prompt": make_text(12, i), "completion": " " + make_text(6, 100 + i)} for i in range(8)]
    path.write_text("\n".join(json.dumps(r) for r in rows))
    from air_ft.config import TrainConfig
    from air_ft.train_data import instruction_dataset

    cfg = TrainConfig(max_steps=1, seq_len=64, batch_size=2, data_format="instruction", data=[{"source": str(path)}],
                      eval_steps=0, save_steps=0, progress=False)
    trainer = build_trainer(apply_lora(model, "factors", rank=2), tok, instruction_dataset(cfg.data), None, cfg,
                            tmp_path / "out")
    batch = trainer.data_collator([trainer.train_dataset[0]])
    n_prompt = len(tok(rows[0]["prompt"], add_special_tokens=False).input_ids)
    labels = batch["labels"][0]
    assert (labels[:n_prompt] == -100).all() and (labels[n_prompt:] != -100).any()


def test_every_recipe_parses():
    recipes = sorted((ROOT / "recipes").rglob("*.yaml"))
    assert any("lora" in p.name for p in recipes)
    for path in recipes:
        load_recipe(str(path))


def test_accelerate_launch_cpu_end_to_end(tmp_path, compressed_dir, text_file):
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    out = tmp_path / "launched"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
           str(ROOT / "accelerate_configs" / "cpu.yaml"), "-m", "air_ft", "train",
           "--recipe", str(ROOT / "recipes" / "tiny" / "svd-lora.yaml"), f"output_dir={out}",
           f"train.compressed_path={compressed_dir}", f"train.data=[{{source: {text_file}}}]",
           f"train.eval_data=[{{source: {text_file}, start: 0.9}}]", "train.max_steps=2", "train.eval_steps=1"]
    proc = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["global_step"] == 2 and summary["budget"]["trainable_params"] > 0
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert any("eval_loss" in e for e in log)
    model, _ = air_ft.load_compressed(out / "merged")
    resolved = yaml.safe_load((out / "recipe.resolved.yaml").read_text())
    assert resolved["train"]["max_steps"] == 2 and model.config.air_ft["ranks"]


def test_an_adapter_saved_empty_is_refused(tmp_path):
    """What DeepSpeed ZeRO-3 writes without gathering: zero-size shards. Merging them would silently do nothing."""
    from safetensors.torch import save_file

    from air_ft.train import read_adapter

    save_file({"base_model.model.x.lora_A.weight": torch.empty(0)}, str(tmp_path / "adapter_model.safetensors"))
    with pytest.raises(RuntimeError, match="zero3_save_16bit_model"):
        read_adapter(tmp_path)


@pytest.mark.parametrize("placement", ["factors", "layer"])
def test_fsdp_adapter_state_matches_peft_on_the_unwrapped_model(placement):
    """FSDP renames modules, so PEFT's own save selects nothing under it; ours gathers the same tensors under the
    same names as PEFT saves for the unwrapped model. Runs FSDP on CPU in one gloo process."""
    import functools

    import torch.distributed as dist
    from peft.utils import get_peft_model_state_dict
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    from torch.distributed.fsdp.wrap import transformer_auto_wrap_policy
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    from air_ft.train import fsdp_adapter_state

    model, _ = make_compressed()
    peft_model = apply_lora(model, placement, 4, 8.0)
    for name, p in peft_model.named_parameters():  # non-zero B, so equal values mean the right tensors
        if "lora_" in name:
            torch.nn.init.normal_(p, generator=torch.Generator().manual_seed(len(name)))
    expected = {k: v.clone() for k, v in get_peft_model_state_dict(peft_model).items()}
    assert expected
    store = dist.HashStore()
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        wrapped = FSDP(peft_model, use_orig_params=True, device_id=torch.device("cpu"),
                       auto_wrap_policy=functools.partial(transformer_auto_wrap_policy,
                                                          transformer_layer_cls={LlamaDecoderLayer}))
        assert any("_fsdp_wrapped_module" in n for n, _ in peft_model.named_parameters())
        assert not get_peft_model_state_dict(peft_model, state_dict=wrapped.state_dict())  # what PEFT would save
        got = fsdp_adapter_state(wrapped, peft_model)
    finally:
        dist.destroy_process_group()
    assert got.keys() == expected.keys()
    for key, value in expected.items():
        torch.testing.assert_close(got[key], value, atol=0, rtol=0)


def test_recipe_weights_reach_the_block_packing(tmp_path, compressed_dir, text_file, tokenizer):
    from air_ft.pipeline.commands import training_sources
    from air_ft.train_data import build_datasets

    other = tmp_path / "other.txt"
    other.write_text(make_text(3000, 5))
    recipe = tiny_recipe(tmp_path, compressed_dir, text_file, "train.max_steps=1",
                         f"train.data=[{{source: {text_file}, weight: 3}}, {{source: {other}}}]")
    texts, weights, _ = training_sources(recipe)
    assert len(texts) == 2 and weights == [3.0, 1.0]
    # the packing takes 3 blocks of the first source for every block of the second: two texts of one word each
    word_a, word_b = _two_words(tokenizer)
    cfg = dataclasses.replace(recipe.train, max_steps=10, batch_size=4, seq_len=8)
    train, _ = build_datasets(tokenizer, cfg, [f"{word_a} " * 400, f"{word_b} " * 400], None, 1, weights=weights)
    first = tokenizer.convert_tokens_to_ids(word_a)
    from_a = sum(all(t == first for t in block) for block in train["input_ids"])
    assert len(train) == 40 and from_a == 30
    with pytest.raises(RecipeError, match="raw text only"):
        tiny_recipe(tmp_path, compressed_dir, text_file, "train.data_format=instruction",
                    f"train.data=[{{source: {text_file}, weight: 2}}]")


def test_finetune_refuses_bad_text_weights_before_wrapping_the_model():
    model, tok = make_compressed()
    texts = [make_text(400, 1), make_text(400, 2)]
    for bad in ([1.0], [1.0, 0.0]):
        with pytest.raises(ValueError, match="one positive weight per training text"):
            finetune(model, tok, texts, max_steps=1, seq_len=16, batch_size=1, text_weights=bad)
    assert not any("lora_" in n for n, _ in model.named_parameters())  # nothing was started


def _two_words(tokenizer) -> tuple[str, str]:
    words = sorted(w for w in tokenizer.get_vocab() if w.isalpha())
    return words[0], words[1]


def test_finetune_without_return_summary_still_pins_the_summary_on_the_model_and_warns():
    """The deprecated form keeps working for existing callers, with a FutureWarning naming the new one."""
    model, tok = make_compressed()
    with pytest.warns(FutureWarning, match="return_summary=True"):
        tuned = finetune(model, tok, [make_text(500, 0)], max_steps=1, lora_rank=2, seq_len=32, batch_size=2,
                         progress=False)
    assert tuned.air_ft_train["tokens"] == 1 * 2 * 32 and "log" in tuned.air_ft_train
