"""What a factored model costs to keep and to run, measured the same way for dense and factored models.

Counts are analytic (parameters, FLOPs per token, checkpoint bytes); speed and memory are measured: prefill
throughput, decode seconds per token with the KV cache at several batch sizes (warm-up excluded, the median of
repeats), and the peak memory of one forward (CUDA: the allocator's peak; CPU: the process's resident set, sampled
by a thread during the forward, above what it was before).
"""

from __future__ import annotations

import ctypes
import functools
import statistics
import threading
import time

import torch
from torch import nn

from air_ft.errors import RecipeError
from air_ft.modeling import FusedLowRankLinear, LowRankLinear, count_parameters, find_targets, prepare_model

__all__ = ["efficiency", "compare", "parameter_counts", "flops_per_token", "checkpoint_bytes", "peak_forward_bytes",
           "factored_at"]


def factored_at(model: nn.Module, ranks: dict[str, int | None]) -> nn.Module:
    """``model`` with each named layer replaced, in place, by its truncated SVD at the given rank (None: left
    dense): a model of the very shapes a compression with that ranks map makes, for measuring what those shapes
    cost (speed, size and memory depend on the shapes alone, not on which method chose the factors)."""
    from air_ft import linalg
    from air_ft.modeling import set_module

    for name, k in ranks.items():
        if k is None:
            continue
        dense = model.get_submodule(name)
        uf, vf = linalg.back_project(*linalg.truncated_svd(dense.weight.detach().float(), k))
        w = dense.weight
        set_module(model, name, LowRankLinear.from_factors(uf, vf, dense.bias, w.dtype, w.device))
    return model


def _linear_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Every decoder linear map, dense or factored, fused or not (the LM head excepted)."""
    out = {name: mod for name, mod in model.named_modules() if isinstance(mod, (LowRankLinear, FusedLowRankLinear))}
    inside = tuple(f"{n}." for n in out)
    out.update({n: m for n, m in find_targets(model).items() if not n.startswith(inside)})
    return out


def _weights(mod: nn.Module) -> int:
    """Weight entries of a linear map as it is stored: ``k (m + n)`` factored, ``m n`` dense (biases apart)."""
    if isinstance(mod, LowRankLinear):
        return mod.factor_u.weight.numel() + mod.factor_v.weight.numel()
    if isinstance(mod, FusedLowRankLinear):  # its rows of the shared V
        return mod.factor_u.weight.numel() + mod.rank * mod.in_features
    return mod.weight.numel()


def parameter_counts(model: nn.Module) -> dict:
    """Parameters of the decoder linear layers (dense ``m n`` each, factored ``k (m + n)``) and of the whole model.

    ``linear_dense`` is what the same layers hold uncompressed, so ``linear / linear_dense`` is the retention.
    """
    layers = _linear_layers(model)
    linear = sum(_weights(m) for m in layers.values())
    dense = sum(m.in_features * m.out_features for m in layers.values())
    return {"linear": linear, "linear_dense": dense, "retention": linear / dense if dense else 1.0,
            "model": count_parameters(model),
            "factored_layers": sum(isinstance(m, (LowRankLinear, FusedLowRankLinear)) for m in layers.values())}


def flops_per_token(model: nn.Module, context: int) -> int:
    """Forward FLOPs for one token at ``context`` tokens of history: ``2 x`` every weight it multiplies
    (decoder linears as stored, LM head) plus attention's ``2 x 2 x layers x context x (heads x head_dim)``
    (scores and the weighted sum of values). Embedding look-ups, norms and softmax are left out."""
    cfg = model.config
    weights = sum(_weights(m) for m in _linear_layers(model).values())
    head = model.get_output_embeddings()
    weights += head.weight.numel() if head is not None else 0
    heads = getattr(cfg, "num_attention_heads", 0)
    head_dim = getattr(cfg, "head_dim", None) or (cfg.hidden_size // heads if heads else 0)
    attention = 4 * getattr(cfg, "num_hidden_layers", 0) * context * heads * head_dim
    return 2 * weights + attention


def checkpoint_bytes(model: nn.Module) -> int:
    """Bytes of the tensors a checkpoint stores (the state dict, tied tensors once), as ``save_pretrained`` writes
    them."""
    unique = {t.data_ptr(): t for t in model.state_dict().values()}
    return sum(t.numel() * t.element_size() for t in unique.values())


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _median_seconds(fn, device: torch.device, repeats: int, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


# part of the efficiency stage's key: a study measured with an earlier memory measure is measured again
MEMORY_MEASURE = "cuda: allocator peak; cpu: glibc heap bytes in use (mallinfo2), else the resident set"


def peak_forward_bytes(model: nn.Module, ids: torch.Tensor, measure: str = "heap") -> tuple[int, str]:
    """Memory one forward needs above what was held before it, and how it was measured. On CPU ``measure`` is
    ``heap`` (glibc's bytes in use; the resident set where glibc lacks it) or ``rss`` (the resident set)."""
    device = ids.device
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        model(input_ids=ids, use_cache=False)
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - before, "cuda allocator peak above the resident weights"
    if measure not in ("heap", "rss"):
        raise ValueError(f"unknown memory measure {measure!r}: use 'heap' or 'rss'")
    in_use = _heap_in_use() if measure == "heap" else None
    if in_use is not None:  # glibc: what is allocated, whatever the heap's fragmentation
        how = "heap bytes in use (glibc mallinfo2), sampled every 1 ms, above the level before the forward"
    else:  # elsewhere the resident set, which also counts freed memory the allocator keeps
        import psutil

        _release_free_heap()
        proc = psutil.Process()

        def in_use() -> int:
            return proc.memory_info().rss

        how = "process resident set, sampled every 1 ms, above the level before the forward"
    before, peak, done = in_use(), [0], threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], in_use())
            time.sleep(0.001)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    model(input_ids=ids, use_cache=False)
    done.set()
    thread.join()
    peak[0] = max(peak[0], in_use())
    return max(0, peak[0] - before), how


class _Mallinfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                      "fsmblks", "uordblks", "fordblks", "keepcost")]


def _heap_in_use():
    """A function giving the bytes glibc's malloc has handed out and not taken back (heap chunks in use plus
    mmapped blocks), or None without glibc >= 2.33.

    The resident set is not a measure of a forward's memory on CPU: freed chunks stay resident while the heap is
    fragmented, and how much of it is depends on the sizes allocated before (glibc moves its mmap threshold up as
    large blocks are freed). Models with many distinct layer ranks then read several MiB above models with few
    (ACIP-style against SVD-LLM(W), ``benchmarks/README.md``), for the same tensors."""
    fn = getattr(_libc(), "mallinfo2", None)
    if fn is None:
        return None
    fn.restype = _Mallinfo2

    def in_use() -> int:
        info = fn()
        return info.uordblks + info.hblkhd

    return in_use


def _release_free_heap() -> None:
    """Hand freed heap memory back to the OS (glibc ``malloc_trim``), so that the resident set before a forward is
    what is live, not what earlier forwards left cached; elsewhere a no-op."""
    trim = getattr(_libc(), "malloc_trim", None)
    if trim is not None:
        trim(0)


@functools.cache
def _libc():
    """glibc, opened once; None elsewhere."""
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:
        return None


def _decode_seconds(model: nn.Module, batch: int, prompt: int, steps: int, repeats: int, vocab: int,
                    device: torch.device) -> float:
    """Median seconds per generated token (one token per sequence per step) with the KV cache."""
    gen = torch.Generator().manual_seed(batch)
    ids = torch.randint(0, vocab, (batch, prompt), generator=gen).to(device)
    nxt = torch.randint(0, vocab, (batch, 1), generator=gen).to(device)

    import inspect

    # transformers >= 5.2x names the KV cache argument `cache`; earlier releases `past_key_values`
    name = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"

    def cache_of(out):
        return out.cache if "cache" in out else out.past_key_values

    def decode() -> float:  # the prefill fills the cache untimed; only the decode steps are timed
        past = cache_of(model(input_ids=ids, use_cache=True))
        _sync(device)
        t0 = time.perf_counter()
        for _ in range(steps):
            past = cache_of(model(input_ids=nxt, use_cache=True, **{name: past}))
        _sync(device)
        return time.perf_counter() - t0

    decode()  # warm-up
    return statistics.median(decode() for _ in range(repeats)) / steps


@torch.no_grad()
def efficiency(model: nn.Module, tok=None, batch_sizes: tuple[int, ...] = (1, 16), prompt_len: int = 64,
               decode_steps: int = 8, prefill_len: int = 256, repeats: int = 3) -> dict:
    """Size and speed of ``model`` on its own device and dtype (compare a dense and a factored model in one run).

    Args:
        model: any causal LM; not modified.
        tok: its tokenizer (only its vocabulary size is used; random token ids are fed).
        batch_sizes: decode batch sizes to time.
        prompt_len: prompt tokens before decoding (the KV cache holds them).
        decode_steps: decode steps timed per repeat (after an untimed prefill that fills the KV cache).
        prefill_len: tokens of the prefill throughput forward (batch 1).
        repeats: timed repeats after one warm-up; medians are reported.

    Returns:
        ``params`` (:func:`parameter_counts`), ``flops_per_token`` (at ``prompt_len`` history),
        ``checkpoint_bytes``, ``peak_forward_bytes`` (median of ``repeats``; + how measured),
        ``prefill_tokens_per_s``, ``decode_s_per_token`` ``{"batch": seconds}`` (string keys, as JSON keeps them),
        and the device, dtype and settings.
    """
    prepare_model(model)
    if any(b < 1 for b in batch_sizes) or min(prompt_len, decode_steps, prefill_len, repeats) < 1:
        raise RecipeError("batch sizes, prompt_len, decode_steps, prefill_len and repeats must be >= 1")
    device = next(model.parameters()).device
    vocab = len(tok) if tok is not None else model.config.vocab_size
    vocab = min(vocab, model.config.vocab_size)
    was_training = model.training
    model.eval()
    ids = torch.randint(0, vocab, (1, prefill_len), generator=torch.Generator().manual_seed(0)).to(device)
    peaks = [peak_forward_bytes(model, ids) for _ in range(repeats)]
    peak, how = int(statistics.median(p for p, _ in peaks)), peaks[0][1]
    prefill = _median_seconds(lambda: model(input_ids=ids, use_cache=False), device, repeats)
    decode = {str(b): _decode_seconds(model, b, prompt_len, decode_steps, repeats, vocab, device)
              for b in batch_sizes}
    model.train(was_training)
    return {"params": parameter_counts(model), "flops_per_token": flops_per_token(model, prompt_len),
            "checkpoint_bytes": checkpoint_bytes(model), "peak_forward_bytes": peak, "peak_forward_measure": how,
            "prefill_tokens_per_s": prefill_len / prefill, "decode_s_per_token": decode,
            "device": str(device), "dtype": str(next(model.parameters()).dtype).replace("torch.", ""),
            "threads": torch.get_num_threads(),
            "settings": {"batch_sizes": list(batch_sizes), "prompt_len": prompt_len, "decode_steps": decode_steps,
                         "prefill_len": prefill_len, "repeats": repeats}}


def compare(loaders: dict, rounds: int = 3, progress: bool = True, **settings) -> dict[str, dict]:
    """:func:`efficiency` of several models measured in turns, in one process: ``rounds`` times over the models
    in order (each loaded by its ``loaders[name]() -> (model, tok)`` and freed before the next), so that a slow
    spell of the machine falls on every model alike. Timings are the median over rounds, with their range
    (``decode_range``: min and max seconds per token per batch size)."""
    import gc

    from tqdm.auto import tqdm

    runs: dict[str, list[dict]] = {name: [] for name in loaders}
    bar = tqdm(total=rounds * len(loaders), desc="speed and size", disable=not progress)
    for i in range(rounds):
        for name, load in loaders.items():
            bar.set_postfix_str(f"round {i + 1}/{rounds}: {name}")
            model, tok = load()
            runs[name].append(efficiency(model, tok, **settings))
            del model
            gc.collect()
            bar.update()
    bar.close()
    out = {}
    for name, results in runs.items():
        first = results[0]
        decode = {b: [r["decode_s_per_token"][b] for r in results] for b in first["decode_s_per_token"]}
        out[name] = {**first, "rounds": rounds,
                     "prefill_tokens_per_s": statistics.median(r["prefill_tokens_per_s"] for r in results),
                     "peak_forward_bytes": int(statistics.median(r["peak_forward_bytes"] for r in results)),
                     "decode_s_per_token": {b: statistics.median(v) for b, v in decode.items()},
                     "decode_range": {b: [min(v), max(v)] for b, v in decode.items()}}
    return out
