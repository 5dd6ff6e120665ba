"""Block-streaming calibration and compression: the same factors as the all-at-once reference, memory that does
not grow with depth, the sequential variant's inputs, grouped influence passes, per-block resume, and several
processes writing the one-process checkpoint."""

from __future__ import annotations

import copy
import gc
import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

import air_ft
from air_ft.compress import get_stats
from air_ft.config import CompressConfig, RecipeError
from air_ft.methods import METHODS
from air_ft.modeling import LowRankLinear, find_targets
from air_ft.stream import find_blocks
from tests.conftest import make_text, tiny_llama

ROOT = Path(__file__).resolve().parents[1]
SMALL = dict(num_samples=8, seq_len=32, batch_size=2, progress=False, sequential=False)  # the reference is dense-input


def _compressed(model, tok, text, **options):
    info = air_ft.compress(model, tok, [text], **{**SMALL, **options})
    return model, info


def _same_state(a: nn.Module, b: nn.Module) -> float:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    return max(float((sa[k] - sb[k]).abs().max()) for k in sa)


@pytest.mark.parametrize("method,options", [("svdllm", {}), ("air", {}), ("air", {"influence": "wxg"}),
                                            ("asvd", {}), ("fwsvd", {}), ("svdllm", {"output_weight": 0.5}),
                                            ("air", {"output_weight": 0.5})])
def test_streaming_gives_the_factors_of_the_all_at_once_reference(tokenizer, text, method, options):
    base = tiny_llama(vocab_size=len(tokenizer), layers=3)
    ref = copy.deepcopy(base)
    cfg = CompressConfig(method=method, **SMALL, **options)
    stats = get_stats(ref, tokenizer, [text], find_targets(ref), cfg,
                      influence=METHODS[method].influence(cfg) is not None)
    air_ft.compress(ref, tokenizer, method=method, stats=stats, **SMALL, **options)
    streamed, info = _compressed(copy.deepcopy(base), tokenizer, text, method=method, **options)
    assert info.stream["blocks"] == 3
    assert _same_state(ref, streamed) < 1e-6
    ids = torch.arange(24).view(2, 12) % len(tokenizer)
    assert not torch.allclose(base(ids).logits, streamed(ids).logits, atol=1e-3)


def test_sequential_blocks_see_the_inputs_of_the_compressed_blocks_before_them(tokenizer, text):
    base = tiny_llama(vocab_size=len(tokenizer), layers=2)
    seq, info = _compressed(copy.deepcopy(base), tokenizer, text, method="svdllm", sequential=True)
    plain, _ = _compressed(copy.deepcopy(base), tokenizer, text, method="svdllm")
    assert info.stream["sequential"]
    # block 0 reads the dense inputs either way
    for name, p in seq.model.layers[0].state_dict().items():
        assert torch.equal(p, plain.model.layers[0].state_dict()[name])
    # block 1: the all-at-once reference on a model whose block 0 is already compressed
    ref = copy.deepcopy(base)
    air_ft.compress(ref, tokenizer, [text], method="svdllm", include=[r"layers\.0\."], **SMALL)
    cfg = CompressConfig(method="svdllm", include=[r"layers\.1\."], **SMALL)
    stats = get_stats(ref, tokenizer, [text], find_targets(ref, cfg.include), cfg, influence=False)
    air_ft.compress(ref, tokenizer, method="svdllm", stats=stats, include=[r"layers\.1\."], **SMALL)
    assert _same_state(ref, seq) < 1e-6
    assert _same_state(plain, seq) > 1e-4  # the sequential Grams really differ


def test_influence_passes_split_by_the_memory_budget_and_checkpointing_change_nothing(tokenizer, text):
    base = tiny_llama(vocab_size=len(tokenizer), layers=3)
    one, info_one = _compressed(copy.deepcopy(base), tokenizer, text, method="air", influence="wxg")
    split, info_split = _compressed(copy.deepcopy(base), tokenizer, text, method="air", influence="wxg",
                                    stats_memory_gb=1e-6, cache=False)
    model = copy.deepcopy(base)
    act, count = model.model.layers[0].mlp.act_fn, [0]

    def counted(x, forward=act.forward):  # module hooks are skipped on recompute; forward is not
        count[0] += 1
        return forward(x)

    act.forward = counted
    ckpt, _ = _compressed(model, tokenizer, text, method="air", influence="wxg", checkpointing=True, cache=False)
    batches = SMALL["num_samples"] // SMALL["batch_size"]
    # the Grams pass, the influence pass and its backward's recompute, + one call while capturing block inputs
    assert count[0] == 3 * batches + 1
    assert info_one.stream["influence_passes"] == 1 and info_split.stream["influence_passes"] == 3
    assert _same_state(one, split) < 1e-5
    assert _same_state(one, ckpt) < 1e-5


def _live_bytes(model: nn.Module) -> int:
    """Bytes of every live tensor that is not a parameter or buffer of ``model`` (storages counted once)."""
    own = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
    seen, total = set(), 0
    with warnings.catch_warnings():  # isinstance on some lazily deprecated objects of torch warns
        warnings.simplefilter("ignore")
        tensors = [o for o in gc.get_objects() if isinstance(o, torch.Tensor)]
    for obj in tensors:
        if not isinstance(obj, nn.Parameter) and obj.device.type == "cpu":
            storage = obj.untyped_storage()
            ptr = storage.data_ptr()
            if ptr and ptr not in own and ptr not in seen:
                seen.add(ptr)
                total += storage.nbytes()
    return total


def _peak_while_compressing(model, tok, text, reference: bool) -> int:
    peak = [0]

    def probe(block, names):  # once per block (streamed) or once for the whole model (reference)
        peak[0] = max(peak[0], _live_bytes(model))

    options = dict(method="air", influence="wxg", stats_memory_gb=1e-6, cache=False, on_block=probe)
    if reference:
        cfg = CompressConfig(**SMALL, **{k: v for k, v in options.items() if k != "on_block"})
        stats = get_stats(model, tok, [text], find_targets(model), cfg, influence=True)
        air_ft.compress(model, tok, stats=stats, **SMALL, **options)
        del stats
    else:
        air_ft.compress(model, tok, [text], **SMALL, **options)
    return peak[0]


def test_peak_statistics_memory_does_not_grow_with_the_number_of_blocks(tokenizer, text):
    gc.collect()
    streamed = [_peak_while_compressing(tiny_llama(len(tokenizer), layers=n), tokenizer, text, False)
                for n in (2, 4)]
    gc.collect()
    reference = [_peak_while_compressing(tiny_llama(len(tokenizer), layers=n), tokenizer, text, True)
                 for n in (2, 4)]
    # the all-at-once path holds every block's Grams and maps, so the probe does see statistics
    assert reference[1] > 1.6 * reference[0]
    assert streamed[1] <= 1.05 * streamed[0]
    assert streamed[1] < 0.5 * reference[1]


def test_stats_are_cached_per_block_and_a_killed_compression_resumes(tokenizer, text):
    base = tiny_llama(vocab_size=len(tokenizer), layers=3)
    calls = []

    def dies_after_block_0(block, names):
        calls.append(block)
        if block == 0:
            raise KeyboardInterrupt  # what a kill looks like to Python

    with pytest.raises(KeyboardInterrupt):
        _compressed(copy.deepcopy(base), tokenizer, text, method="air", on_block=dies_after_block_0)
    cache = Path(os.environ["AIR_FT_CACHE"])
    (stats_dir,) = (cache / "stats").glob("blocks-*")
    names = sorted(p.name for p in stats_dir.glob("*.json"))
    assert [n for n in names if n.startswith("grams-")] == ["grams-0000.json", "grams-0001.json", "grams-0002.json"]
    assert len([n for n in names if n.startswith("influence-")]) == 3
    (run_dir,) = (cache / "runs").iterdir()
    assert sorted(p.name for p in run_dir.glob("*.json")) == ["factors-0000.json"]

    calls.clear()
    # settings that cannot change the factors do not key the resume files: the progress bars, and a lever's own
    # setting while the lever is off (the refinement's rate without refinement steps)
    resumed, info = _compressed(copy.deepcopy(base), tokenizer, text, method="air", progress=False, refine_lr=1e-2,
                                on_block=lambda block, names: calls.append(block))
    assert info.stream["resumed_blocks"] == 1 and info.calibration_cached
    assert calls == [1, 2]  # block 0 was not factored again
    assert not run_dir.exists()  # a finished run leaves no partial state behind
    fresh, _ = _compressed(copy.deepcopy(base), tokenizer, text, method="air", cache=False)
    assert _same_state(fresh, resumed) == 0.0
    assert set(info.objective) == {n for n, m in resumed.named_modules() if isinstance(m, LowRankLinear)}
    # another retention on the same data: every statistic comes from the cache, no block runs at all
    model, ran = copy.deepcopy(base), []
    for blk in model.model.layers:
        blk.register_forward_pre_hook(lambda *a: ran.append(1))
    _, again = _compressed(model, tokenizer, text, method="air", retention=0.4)
    assert again.calibration_cached and not ran


def test_layers_outside_the_decoder_blocks_are_refused_with_what_to_do(tokenizer, text):
    model = tiny_llama(vocab_size=len(tokenizer))
    model.model.extra = nn.Linear(64, 64)
    with pytest.raises(RecipeError, match="exclude"):
        find_blocks(model, find_targets(model))


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory, tokenizer):
    path = tmp_path_factory.mktemp("dense")
    tiny_llama(vocab_size=len(tokenizer), layers=3).save_pretrained(path)
    tokenizer.save_pretrained(path)
    (path / "cal.txt").write_text(make_text(6000, 1))
    return path


def _launch(tiny_dir: Path, out: Path, processes: int, *overrides: str, env: dict | None = None) -> dict:
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", **(env or {})}
    launch = ([sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes",
               str(processes), "--main_process_port", "29517"] if processes > 1 else [sys.executable])
    cmd = [*launch, "-m", "air_ft", "compress", "--recipe", str(ROOT / "recipes" / "tiny" / "air-compress.yaml"),
           f"output_dir={out}", f"model.name_or_path={tiny_dir}",
           f"data.calibration=[{{source: {tiny_dir / 'cal.txt'}}}]", *overrides]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    from safetensors.torch import load_file

    meta = json.loads((out / "air_ft.json").read_text())["metadata"]["compress"]
    return {"tensors": load_file(str(out / "model.safetensors")), "stream": meta["stream"]}


@pytest.mark.slow
def test_two_processes_write_the_one_process_checkpoint(tmp_path, tiny_dir):
    one = _launch(tiny_dir, tmp_path / "one", 1)
    shared = _launch(tiny_dir, tmp_path / "two", 2, "compress.data_parallel=false")
    sharded = _launch(tiny_dir, tmp_path / "two-dp", 2)
    assert one["stream"]["processes"] == 1 and shared["stream"]["processes"] == 2
    assert one["tensors"].keys() == shared["tensors"].keys() == sharded["tensors"].keys()
    # matrices shared out, every process calibrating on everything: the same bits
    assert all(torch.equal(one["tensors"][k], shared["tensors"][k]) for k in one["tensors"])
    # calibration batches sharded, statistics summed over processes: equal up to the order of float sums
    for k, t in one["tensors"].items():
        torch.testing.assert_close(sharded["tensors"][k], t, rtol=1e-4, atol=1e-5)
    # with the statistics cache (written by the main process), then a second run that reads it all back
    cache = tmp_path / "cache"
    first = _launch(tiny_dir, tmp_path / "two-cache", 2, "compress.cache=true", env={"AIR_FT_CACHE": str(cache)})
    again = _launch(tiny_dir, tmp_path / "two-cache-again", 2, "compress.cache=true", "compress.retention=0.4",
                    env={"AIR_FT_CACHE": str(cache)})
    assert first["stream"]["influence_passes"] == 1 and again["stream"]["influence_passes"] == 0
    for k, t in first["tensors"].items():
        torch.testing.assert_close(t, sharded["tensors"][k], rtol=1e-6, atol=1e-7)


@pytest.mark.slow
def test_two_processes_refine_blocks_as_one_process_does(tmp_path, tiny_dir):
    refine = ("compress.method=svdllm", "compress.refine_steps=6", "compress.refine_lr=0.003")
    one = _launch(tiny_dir, tmp_path / "one", 1, *refine)
    shared = _launch(tiny_dir, tmp_path / "two", 2, "compress.data_parallel=false", *refine)
    sharded = _launch(tiny_dir, tmp_path / "two-dp", 2, *refine)
    assert one["stream"]["refine"]["tokens"] == shared["stream"]["refine"]["tokens"] == 3 * 6 * 2 * 32
    # every process refining on every batch: the one-process factors, bit for bit
    assert all(torch.equal(one["tensors"][k], shared["tensors"][k]) for k in one["tensors"])
    # shares of the batches, gradients averaged: each step sees two batches, and every block still improves
    assert sharded["stream"]["refine"]["tokens"] == 2 * one["stream"]["refine"]["tokens"]
    for r in sharded["stream"]["refine"]["blocks"].values():
        assert r["after"] < r["before"]


def _arch(name: str):
    import transformers as T

    common = dict(vocab_size=60, hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
                  max_position_embeddings=128)
    return {"qwen2": lambda: T.Qwen2Config(**common, num_key_value_heads=2),
            "mistral": lambda: T.MistralConfig(**common, num_key_value_heads=2, sliding_window=8),
            "gemma2": lambda: T.Gemma2Config(**common, num_key_value_heads=2, head_dim=16, sliding_window=8),
            "gpt_neox": lambda: T.GPTNeoXConfig(**common)}[name]()


@pytest.mark.parametrize("arch", ["qwen2", "mistral", "gemma2", "gpt_neox"])
def test_streaming_matches_the_reference_on_other_architectures(arch):
    """Blocks that take other arguments: sliding-window masks (Mistral; Gemma 2 alternates sliding and full
    attention, so each block's mask is captured apart), GPT-NeoX's fused QKV projection and parallel residual; AIR
    with one block per influence pass, so every pass starts from stored inputs."""
    from transformers import AutoModelForCausalLM

    from air_ft import linalg
    from air_ft.calibration import calibrate

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_config(_arch(arch)).eval()
    windows = torch.randint(0, 60, (8, 24), generator=torch.Generator().manual_seed(1))
    ref = copy.deepcopy(base)
    targets = find_targets(ref)
    stats = calibrate(ref, windows, targets, influence=False, batch_size=2, progress=False)
    roots = {g: linalg.whitening_factor(stats.grams[g])[0] for g in set(stats.group_of.values())}
    stats.influence = calibrate(ref, windows, targets, influence=True, batch_size=2, progress=False,
                                whitening={n: roots[g] for n, g in stats.group_of.items()}).influence
    air_ft.compress(ref, None, method="air", retention=0.5, stats=stats, batch_size=2, progress=False)
    streamed = copy.deepcopy(base)
    info = air_ft.compress(streamed, None, method="air", retention=0.5, windows=windows, batch_size=2,
                           progress=False, cache=False, stats_memory_gb=1e-6, sequential=False)
    assert info.stream["blocks"] == 3 and info.stream["influence_passes"] == 3
    assert _same_state(ref, streamed) < 1e-6


def test_bad_calibration_windows_are_refused_before_any_work(tokenizer):
    model = tiny_llama(vocab_size=len(tokenizer))
    for bad in (torch.zeros(8, dtype=torch.long), torch.zeros(2, 8), torch.zeros(2, 1, dtype=torch.long)):
        with pytest.raises(RecipeError, match=r"windows must be an \(N, T\) tensor of token ids"):
            air_ft.compress(model, tokenizer, method="svdllm", windows=bad)
    assert not any(isinstance(m, LowRankLinear) for m in model.modules())


def test_sequential_reuses_the_first_groups_statistics_and_only_those(tokenizer, text):
    """With ``sequential`` the first group still sees the dense model, so its Grams and maps are the cache's;
    later groups see compressed blocks, so theirs are never written to (or read from) the shared cache."""
    base = tiny_llama(vocab_size=len(tokenizer), layers=3)
    plain, _ = _compressed(copy.deepcopy(base), tokenizer, text, method="air", stats_memory_gb=1e-6)
    (stats_dir,) = (Path(os.environ["AIR_FT_CACHE"]) / "stats").glob("blocks-*")
    before = {p.name: p.stat().st_mtime_ns for p in stats_dir.iterdir()}
    seq, info = _compressed(copy.deepcopy(base), tokenizer, text, method="air", stats_memory_gb=1e-6,
                            sequential=True)
    assert {p.name: p.stat().st_mtime_ns for p in stats_dir.iterdir()} == before  # nothing rewritten
    assert info.stream["influence_passes"] == 2  # the first group's maps came from the cache
    fresh, _ = _compressed(copy.deepcopy(base), tokenizer, text, method="air", stats_memory_gb=1e-6,
                           sequential=True, cache=False)
    assert _same_state(fresh, seq) < 1e-6 and _same_state(plain, seq) > 1e-4


@pytest.mark.parametrize("method,options,signals", [
    ("air", dict(output_weight=0.5, als_output_side=True), {"influence-fisher_whitened+ograd-cholesky-0.0"}),
    ("air", dict(influence="wxg"), {"influence-wxg+fisher+ograd"}),
    ("svdllm", dict(output_weight=0.5), {"influence-ograd"})])
def test_global_allocation_and_compression_share_one_backward_of_the_dense_model(tokenizer, text, method, options,
                                                                                 signals):
    """Global rank allocation ranks on the dense model's statistics and the compression's first group reads the
    dense model's too: with the cache, the allocation pass measures what the compression reads (or, for a method
    without influence, the output-gradient Grams alone) and the compression reads it back: one backward in all,
    and the factors of a run without the cache."""
    base = tiny_llama(vocab_size=len(tokenizer), layers=3)
    model, backward_batches = copy.deepcopy(base), []
    model.lm_head.register_full_backward_hook(lambda *a: backward_batches.append(1))
    opts = dict(method=method, rank_allocation="global", sequential=True, **options)
    _, info = _compressed(model, tokenizer, text, **opts)
    assert len(backward_batches) == SMALL["num_samples"] // SMALL["batch_size"]  # one pass over the windows
    assert info.stream["influence_passes"] == 0 and len(set(info.ranks.values())) > 1
    (stats_dir,) = (Path(os.environ["AIR_FT_CACHE"]) / "stats").glob("blocks-*")
    assert {p.name.rsplit("-", 1)[0] for p in stats_dir.glob("influence-*.json")} == signals
    fresh, off = _compressed(copy.deepcopy(base), tokenizer, text, cache=False, **opts)
    assert off.ranks == info.ranks and _same_state(fresh, model) < 1e-6


def test_a_layers_dense_weight_is_freed_as_soon_as_its_factors_replace_it(tokenizer, text):
    """When the last decoder block runs (for its own statistics), the first block's dense weights must already be
    gone: memory then holds the factors of the finished blocks and the weights of the others, never both."""
    import weakref

    model = tiny_llama(vocab_size=len(tokenizer), layers=4)
    first = {n: weakref.ref(m.weight) for n, m in model.model.layers[0].named_modules()
             if isinstance(m, nn.Linear)}
    last = {n: weakref.ref(m.weight) for n, m in model.model.layers[-1].named_modules()
            if isinstance(m, nn.Linear)}
    seen = []

    def check(module, args):
        gc.collect()
        seen.append(({n: r() is None for n, r in first.items()}, {n: r() is None for n, r in last.items()}))

    model.model.layers[-1].register_forward_pre_hook(check)
    air_ft.compress(model, tokenizer, [text], method="svdllm", retention=0.5, num_samples=4, seq_len=32,
                    batch_size=2, sequential=True, cache=False, progress=False)
    assert seen, "the last block never ran"
    freed_first, freed_last = seen[-1]
    assert len(freed_first) == 7 and all(freed_first.values()), freed_first
    assert not any(freed_last.values())  # the block still to be factored keeps its weights


def _exit_error(model, base, ids) -> float:
    """Relative squared error of the last hidden state against the dense model's."""
    with torch.no_grad():
        got = model(ids, output_hidden_states=True).hidden_states[-1]
        want = base(ids, output_hidden_states=True).hidden_states[-1]
    return float((got - want).square().sum() / want.square().sum())


def test_block_refinement_tunes_only_the_factors_toward_the_dense_exit_and_resumes_exactly(tokenizer, text):
    base = tiny_llama(vocab_size=len(tokenizer), layers=3)
    opts = dict(method="svdllm", retention=0.4, sequential=True)
    plain, _ = _compressed(copy.deepcopy(base), tokenizer, text, **opts)
    tuned, info = _compressed(copy.deepcopy(base), tokenizer, text, refine_steps=24, refine_lr=3e-3, **opts)
    record = info.stream["refine"]
    assert record["steps_per_block"] == 24 and set(record["blocks"]) == {0, 1, 2}
    assert record["tokens"] == 3 * 24 * 2 * 32  # blocks x steps x windows x tokens
    for block, r in record["blocks"].items():
        assert r["after"] < r["before"], block  # each block ends closer to the dense exit on calibration data
    assert info.calibration_seconds >= record["seconds"] > 0
    ids = torch.tensor([tokenizer.encode(text[5000:5600])[:48]])  # text the calibration windows need not contain
    assert _exit_error(tuned, base, ids) < 0.97 * _exit_error(plain, base, ids)  # held out: 0.276 vs 0.294
    ps, pt = plain.state_dict(), tuned.state_dict()
    changed = {k for k in ps if not torch.equal(ps[k], pt[k])}
    assert changed and all(k.endswith(("factor_u.weight", "factor_v.weight")) for k in changed)
    # a killed run resumes to the same factors: the dense states are replayed up to the first unfinished block
    calls = []

    def dies_after_block_0(block, names):
        calls.append(block)
        if block == 0:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        _compressed(copy.deepcopy(base), tokenizer, text, refine_steps=24, refine_lr=3e-3, on_block=dies_after_block_0,
                    **opts)
    resumed, again = _compressed(copy.deepcopy(base), tokenizer, text, refine_steps=24, refine_lr=3e-3, **opts)
    assert again.stream["resumed_blocks"] == 1 and set(again.stream["refine"]["blocks"]) == {1, 2}
    assert _same_state(resumed, tuned) == 0.0


def test_the_token_refinement_loss_averages_each_tokens_relative_error():
    from air_ft.refine import refine_error

    g = torch.Generator().manual_seed(0)
    y = torch.randn(2, 5, 8, generator=g, dtype=torch.float64)
    y[0, 0] *= 1000.0  # an attention sink's massive state
    out = y + 0.1 * torch.randn(2, 5, 8, generator=g, dtype=torch.float64)
    num, den = refine_error(out, y, "token")
    by_hand = [float((out[b, t] - y[b, t]).square().sum() / y[b, t].square().sum())
               for b in range(2) for t in range(5)]
    assert float(num / den) == pytest.approx(sum(by_hand) / 10, rel=1e-12) and float(den) == 10
    num, den = refine_error(out, y, "hidden")
    assert float(num / den) == pytest.approx(float((out - y).square().sum() / y.square().sum()), rel=1e-12)
    # the massive token owns the whole-state error's denominator; the token loss does not see its scale
    assert float(num / den) < 1e-4 < sum(by_hand) / 10
    with pytest.raises(ValueError, match="refine loss 'x' is unknown"):
        refine_error(out, y, "x")


class ResidualBlock(nn.Module):
    """A residual block around one factored 8 x 8 layer: the smallest thing block refinement tunes."""

    def __init__(self, rank: int):
        super().__init__()
        self.proj = LowRankLinear(8, 8, rank)

    def forward(self, h):
        return h + self.proj(h)


def test_refine_block_lowers_and_records_the_loss_it_is_given():
    from air_ft.refine import refine_block

    g = torch.Generator().manual_seed(1)
    dense = torch.randn(8, 8, generator=g) / 4
    hidden = [torch.randn(2, 6, 8, generator=g) for _ in range(2)]
    for h in hidden:
        h[:, 0] *= 300.0  # the first token of every window is an attention sink
    targets = [h + h @ dense.T for h in hidden]
    records, blocks = {}, {}
    for loss in ("hidden", "token"):
        torch.manual_seed(0)
        blocks[loss] = block = ResidualBlock(rank=2)
        with torch.no_grad():
            want = sum(refine_error_of(block(h), y, loss) for h, y in zip(hidden, targets))
        records[loss] = refine_block(block, hidden, [((), {})] * 2, targets, steps=60, lr=1e-2, loss=loss)
        assert records[loss].before == pytest.approx(want[0] / want[1], rel=1e-6)
        assert records[loss].after < records[loss].before

    def token_error(block):
        with torch.no_grad():
            num, den = sum(refine_error_of(block(h), y, "token") for h, y in zip(hidden, targets))
        return float(num / den)

    # the sinks own the whole-state error: fitted on it, the other tokens keep more error than the token loss leaves
    assert token_error(blocks["token"]) < 0.8 * token_error(blocks["hidden"])


def test_rms_scaled_refinement_does_not_depend_on_how_a_layer_splits_its_scale():
    """``lr_scale: rms``: each factor steps by the same fraction of its size, so factors ``U c``, ``V / c`` (the
    same layer) refine to the same product, step for step; at an absolute rate the split changes the result."""
    from air_ft.refine import refine_block

    g = torch.Generator().manual_seed(2)
    hidden = [torch.randn(2, 6, 8, generator=g, dtype=torch.float64) for _ in range(2)]
    targets = [h + h @ (torch.randn(8, 8, generator=g, dtype=torch.float64) / 4).T for h in hidden]
    torch.manual_seed(0)
    start = ResidualBlock(rank=3).double()

    def refined(c: float, lr_scale: str, lr: float) -> tuple[torch.Tensor, object]:
        block = copy.deepcopy(start)
        with torch.no_grad():
            block.proj.factor_u.weight.mul_(c)
            block.proj.factor_v.weight.div_(c)
        rec = refine_block(block, hidden, [((), {})] * 2, targets, steps=12, lr=lr, sharded=False,
                           lr_scale=lr_scale)
        return (block.proj.factor_u.weight @ block.proj.factor_v.weight).detach(), rec

    even, rec = refined(1.0, "rms", 0.05)
    lopsided, rec_lopsided = refined(30.0, "rms", 0.05)
    assert rec.after < rec.before and rec.before == pytest.approx(rec_lopsided.before, rel=1e-12)
    moved = (even - (start.proj.factor_u.weight @ start.proj.factor_v.weight).detach()).abs().max()
    assert (even - lopsided).abs().max() < 1e-4 * moved  # Adam's eps (1e-8) is the only difference
    absolute, _ = refined(1.0, "absolute", 0.01)
    absolute_lopsided, _ = refined(30.0, "absolute", 0.01)
    assert (absolute - absolute_lopsided).abs().max() > 0.1 * moved
    with pytest.raises(ValueError, match="refine lr scale 'x' is unknown"):
        refine_block(copy.deepcopy(start), hidden, [((), {})] * 2, targets, steps=1, lr=0.1, lr_scale="x")


def refine_error_of(out, y, loss):
    from air_ft.refine import refine_error

    return torch.stack(refine_error(out.double(), y.double(), loss))


def test_token_refinement_lowers_the_token_error_and_reports_it(tokenizer, text):
    base = tiny_llama(vocab_size=len(tokenizer), layers=2)
    opts = dict(method="svdllm", retention=0.4, sequential=True, refine_steps=24, refine_lr=3e-3)
    hidden, h_info = _compressed(copy.deepcopy(base), tokenizer, text, **opts)
    token, t_info = _compressed(copy.deepcopy(base), tokenizer, text, refine_loss="token", **opts)
    assert t_info.stream["refine"]["loss"] == "token" and h_info.stream["refine"]["loss"] == "hidden"
    assert h_info.stream["refine"]["lr_scale"] == "absolute"
    for block, r in t_info.stream["refine"]["blocks"].items():
        assert r["after"] < r["before"], block
    # block 0 sees the same inputs in both runs: its record reads the objective each optimized
    first_t, first_h = t_info.stream["refine"]["blocks"][0], h_info.stream["refine"]["blocks"][0]
    assert first_t["before"] != first_h["before"]
    assert _same_state(hidden, token) > 0.0


@pytest.mark.parametrize("options,match", [
    (dict(refine_steps=4, refine_loss="sink"), "refine_loss 'sink' is unknown"),
    (dict(refine_steps=4, refine_lr_scale="relative"), "refine_lr_scale 'relative' is unknown"),
    (dict(refine_steps=4, sequential=False), "refine_steps needs sequential: true"),
    (dict(refine_steps=-1), "refine_steps must be an integer >= 0"),
    (dict(refine_steps=4, refine_lr=0.0), "refine_lr must be a positive number"),
    (dict(refine_steps=4, method="svd"), "set refine_steps: 0"),
    (dict(influence_samples=-8), "influence_samples must be an integer >= 0"),
    (dict(influence_samples=0.5), "influence_samples must be an integer >= 0"),
])
def test_bad_refinement_settings_are_refused_before_any_work(tokenizer, text, options, match):
    model = tiny_llama(vocab_size=len(tokenizer))
    with pytest.raises(RecipeError, match=match):
        air_ft.compress(model, tokenizer, [text], **{**SMALL, "sequential": True, **options})
    assert not any(isinstance(m, LowRankLinear) for m in model.modules())


@pytest.mark.parametrize("method,options", [("air", {}), ("air", {"influence": "wxg"}), ("fwsvd", {}),
                                            ("air2s", {"sequential": True})])
def test_influence_samples_measures_the_backward_on_the_first_windows_alone(tokenizer, text, method, options):
    """``influence_samples: n``: the influence maps and output-gradient Grams of the first n windows (whole
    batches), the Grams of every window. Streamed, it gives the factors of the all-at-once reference with those
    statistics; its maps are those of a calibration of the first windows alone, and differ from every window's."""
    from air_ft.calibration import calibrate
    from air_ft.data import sample_windows

    base = tiny_llama(vocab_size=len(tokenizer), layers=3)
    few = dict(influence_samples=3, **options)  # 3 windows: the first two batches of 2
    cfg = CompressConfig(method=method, **{**SMALL, **few})
    ref = copy.deepcopy(base)
    stats = get_stats(ref, tokenizer, [text], find_targets(ref), cfg, influence=True)
    every = get_stats(ref, tokenizer, [text], find_targets(ref), CompressConfig(method=method, **{**SMALL, **options}),
                      influence=True)
    windows = sample_windows(tokenizer, [text], SMALL["num_samples"], SMALL["seq_len"], 0)
    alone = calibrate(ref, windows[:4], find_targets(ref), influence=True, progress=False)
    for name, gram in every.grams.items():
        assert torch.equal(stats.grams[name], gram)  # the Grams read every window
    signal = "fisher" if method == "fwsvd" else "fisher_whitened"
    signal = "wxg" if options.get("influence") == "wxg" else signal
    for name, m in stats.influence[signal].items():
        e = every.influence[signal][name]
        assert (m - e).abs().max() > 0.1 * e.abs().max()
        if signal in alone.influence:
            torch.testing.assert_close(m, alone.influence[signal][name], rtol=1e-5, atol=1e-9)
    for name, h in stats.influence["ograd"].items():  # every backward also measures the output-gradient Grams
        torch.testing.assert_close(h, alone.influence["ograd"][name], rtol=1e-6, atol=0.0)
    if method == "air2s":
        stats = None  # global allocation: the stream against a cache-less stream of its own
        ref, _ = _compressed(copy.deepcopy(base), tokenizer, text, method=method, cache=False, **few)
    else:
        air_ft.compress(ref, tokenizer, method=method, stats=stats, **SMALL, **few)
    streamed, info = _compressed(copy.deepcopy(base), tokenizer, text, method=method, **few)
    assert info.stream["influence_tokens"] == 4 * SMALL["seq_len"]
    assert _same_state(ref, streamed) < 1e-6
    whole, every_info = _compressed(copy.deepcopy(base), tokenizer, text, method=method, **options)
    assert every_info.ranks != info.ranks or _same_state(whole, streamed) > 1e-4
