"""Efficiency counts follow the ranks; speed and memory are measured and finite."""

from __future__ import annotations

import torch

import air_ft
from air_ft.efficiency import checkpoint_bytes, efficiency, flops_per_token, parameter_counts


def test_counts_match_the_ranks_and_the_checkpoint(tmp_path, model, tokenizer):
    dense = parameter_counts(model)
    info = air_ft.compress(model, tokenizer, None, method="svd", retention=0.5, progress=False)
    counts = parameter_counts(model)
    shapes = {n: m for n, m in model.named_modules() if isinstance(m, air_ft.LowRankLinear)}
    expected = sum(k * (shapes[n].in_features + shapes[n].out_features) for n, k in info.ranks.items() if k)
    expected += sum(dict(model.named_modules())[n].weight.numel() for n, k in info.ranks.items() if k is None)
    assert counts["linear"] == expected == info.linear_params_after  # tiny_llama has no biases
    assert counts["linear_dense"] == dense["linear"] == info.linear_params_before
    assert counts["model"] == info.model_params_after
    cfg = model.config
    head = model.lm_head.weight.numel()
    attention = 4 * cfg.num_hidden_layers * 100 * cfg.hidden_size
    assert flops_per_token(model, 100) == 2 * (expected + head) + attention
    air_ft.save_compressed(model, tokenizer, tmp_path / "c")
    size = (tmp_path / "c" / "model.safetensors").stat().st_size
    assert checkpoint_bytes(model) <= size <= checkpoint_bytes(model) + 64 * 1024  # + the safetensors header


def test_tied_weights_are_stored_once(tokenizer):
    from .conftest import tiny_llama

    tied, untied = tiny_llama(len(tokenizer), tie=True), tiny_llama(len(tokenizer), tie=False)
    assert checkpoint_bytes(untied) - checkpoint_bytes(tied) == untied.lm_head.weight.numel() * 4


def test_efficiency_measures_speed_and_memory(model, tokenizer):
    out = efficiency(model, tokenizer, batch_sizes=(1, 2), prompt_len=8, decode_steps=2, prefill_len=16, repeats=1)
    assert set(out["decode_s_per_token"]) == {"1", "2"} and all(v > 0 for v in out["decode_s_per_token"].values())
    assert out["prefill_tokens_per_s"] > 0 and out["dtype"] == "float32"  # peak memory: the tests below
    assert not model.training and next(model.parameters()).requires_grad  # left as it was
    # 2 x every multiplied weight (decoder linears, LM head) + attention's 4 x layers x context x heads x head_dim
    cfg = model.config
    linears = sum(m.weight.numel() for n, m in model.named_modules()
                  if isinstance(m, torch.nn.Linear) and n != "lm_head")
    attention = 4 * cfg.num_hidden_layers * 8 * cfg.num_attention_heads * (cfg.hidden_size // cfg.num_attention_heads)
    assert out["flops_per_token"] == 2 * (linears + model.lm_head.weight.numel()) + attention


class _Allocates(torch.nn.Module):
    """A "model" whose forward holds 32 MiB and then 16 MiB more at once, a known peak of 48 MiB."""

    def forward(self, input_ids, use_cache=False):
        import time

        a = torch.ones(8 << 20)
        b = torch.ones(4 << 20)
        time.sleep(0.02)  # long enough for the 1 ms sampler to see both alive
        return a[:1] + b[:1]


def test_peak_forward_memory_is_what_the_forward_holds_whatever_the_heap_held_before():
    import pytest

    from air_ft.efficiency import _heap_in_use, peak_forward_bytes

    if _heap_in_use() is None:
        pytest.skip("needs glibc's mallinfo2; elsewhere the resident set is measured")
    ids = torch.zeros(1, 1, dtype=torch.long)
    mib = 1 << 20
    clean, how = peak_forward_bytes(_Allocates(), ids)
    assert 48 * mib <= clean < 49 * mib and "mallinfo2" in how
    # a heap left fragmented by many freed blocks of many sizes (as a model of uneven ranks leaves it) reads the same
    sizes = torch.randint(10_000, 400_000, (300,), generator=torch.Generator().manual_seed(0))
    keep = [torch.empty(int(n)) for n in sizes]
    del keep[::2]
    fragmented, _ = peak_forward_bytes(_Allocates(), ids)
    assert abs(fragmented - clean) < mib // 4


def test_fusing_the_v_factors_of_one_input_changes_no_output_and_no_count():
    import copy

    from air_ft.modeling import FusedLowRankLinear, SharedInputV, fuse_shared_inputs

    from .conftest import tiny_llama

    model = tiny_llama(vocab_size=60, layers=2)
    air_ft.compress(model, None, method="svd", retention=0.5, progress=False)
    fused = copy.deepcopy(model)
    assert fuse_shared_inputs(fused) == 4  # q/k/v and gate/up of each of the two blocks
    attn = fused.model.layers[0].self_attn
    assert all(isinstance(getattr(attn, p), FusedLowRankLinear) for p in ("q_proj", "k_proj", "v_proj"))
    assert isinstance(attn.shared_v_0, SharedInputV)
    assert attn.shared_v_0.weight.shape[0] == sum(getattr(attn, p).rank for p in ("q_proj", "k_proj", "v_proj"))
    shared = {id(m.weight) for m in fused.modules() if isinstance(m, SharedInputV)}
    calls, linear = [0], torch.nn.functional.linear

    def counted(x, weight, bias=None):
        calls[0] += id(weight) in shared
        return linear(x, weight, bias)

    ids = torch.randint(0, 60, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.nn.functional.linear = counted
        try:
            out = fused(ids).logits
        finally:
            torch.nn.functional.linear = linear
        assert calls[0] == 4  # one stacked V matmul per input: attention's and the MLP's, in each block
        torch.testing.assert_close(out, model(ids).logits, rtol=1e-5, atol=1e-5)
        assert torch.equal(fused.generate(ids[:1, :4], max_new_tokens=4, do_sample=False),
                           model.generate(ids[:1, :4], max_new_tokens=4, do_sample=False))
    assert parameter_counts(fused) == parameter_counts(model)
    assert flops_per_token(fused, 16) == flops_per_token(model, 16)
