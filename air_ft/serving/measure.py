"""Serving checkpoints with vLLM: greedy agreement with air_ft's transformers path, and speed against dense.

    from air_ft.serving.measure import serve_checkpoints
    figures = serve_checkpoints({"dense": "path/dense", "air-r0.60": "…/checkpoint"}, prompts, reference="dense")

Every checkpoint is served in turn in this process (one vLLM engine at a time), so ratios against dense come
from one run on one machine. vLLM starts its engine in a spawned process: a script that calls these functions
needs the ``if __name__ == "__main__":`` guard.
"""

from __future__ import annotations

import contextlib
import gc
import math
import statistics
import time
from pathlib import Path

import torch

from air_ft.serving import check_servable, require_vllm

__all__ = ["start_engine", "engine", "greedy", "reference_greedy", "agreement", "speed", "weight_bytes", "kv_capacity",
           "serve_checkpoints", "serve_recipe", "prompts_from_texts", "dense_directory"]


def start_engine(path: str | Path, *, dtype: str = "float32", tensor_parallel_size: int = 1, seed: int = 0,
                 **engine_args):
    """A vLLM :class:`~vllm.LLM` serving the checkpoint at ``path`` (factored or dense) through air_ft's plugin."""
    check_servable(path)
    vllm = require_vllm()
    return vllm.LLM(str(path), dtype=dtype, tensor_parallel_size=tensor_parallel_size, seed=seed, **engine_args)


@contextlib.contextmanager
def engine(path: str | Path, **kwargs):
    """:func:`start_engine` as a context: the engine's processes are shut down on leaving it."""
    llm = start_engine(path, **kwargs)
    try:
        yield llm
    finally:
        core = getattr(llm.llm_engine, "engine_core", None)
        if core is not None and hasattr(core, "shutdown"):
            core.shutdown()
        del llm
        gc.collect()


def _params(max_tokens: int, logprobs: int | None = None):
    from vllm import SamplingParams

    return SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True, logprobs=logprobs)


def greedy(llm, prompts: list[list[int]], max_tokens: int = 32) -> list[dict]:
    """Greedy continuations of token-id prompts: ``[{"ids": [...], "logprobs": [...]}]`` (the chosen tokens')."""
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], _params(max_tokens, logprobs=1), use_tqdm=False)
    result = []
    for out in outs:
        seq = out.outputs[0]
        result.append({"ids": list(seq.token_ids),
                       "logprobs": [float(step[t].logprob) for step, t in zip(seq.logprobs, seq.token_ids)]})
    return result


@torch.no_grad()
def reference_greedy(path: str | Path, prompts: list[list[int]], max_tokens: int = 32,
                     dtype: str = "float32") -> list[dict]:
    """The same greedy continuations from air_ft's transformers path (:func:`air_ft.load_compressed` for a
    factored checkpoint, :func:`air_ft.load_model` for a dense one), with the chosen tokens' log-probabilities."""
    import air_ft
    from air_ft.checkpoint import MARKER

    if (Path(path) / MARKER).exists():
        model, _ = air_ft.load_compressed(path, dtype=dtype)
    else:
        model, _ = air_ft.load_model(str(path), None, dtype)
    result = []
    for prompt in prompts:  # plain greedy decoding with the KV cache: no generation config, no end token
        step, past, ids, logprobs = torch.tensor([prompt]), None, [], []
        for _ in range(max_tokens):
            out = model(input_ids=step, past_key_values=past, use_cache=True)
            past, logp = out.past_key_values, out.logits[0, -1].float().log_softmax(-1)
            token = int(logp.argmax())
            ids.append(token)
            logprobs.append(float(logp[token]))
            step = torch.tensor([[token]])
        result.append({"ids": ids, "logprobs": logprobs})
    del model
    gc.collect()
    return result


def agreement(served: list[dict], reference: list[dict]) -> dict:
    """How far two sets of greedy continuations agree: prompts equal in every token, the tokens matched before
    the first difference, and the largest log-probability difference over the tokens both chose alike."""
    equal, matched, diffs = 0, [], []
    for a, b in zip(served, reference):
        n = next((i for i, (x, y) in enumerate(zip(a["ids"], b["ids"])) if x != y), min(len(a["ids"]), len(b["ids"])))
        equal += a["ids"] == b["ids"]
        matched.append(n)
        diffs.extend(abs(x - y) for x, y in zip(a["logprobs"][:n], b["logprobs"][:n]))
    return {"prompts": len(served), "equal": equal, "tokens": len(served[0]["ids"]) if served else 0,
            "matched_tokens": matched, "max_logprob_diff": max(diffs) if diffs else None}


def _timed(llm, prompts: list[list[int]], max_tokens: int) -> float:
    start = time.perf_counter()
    llm.generate([{"prompt_token_ids": p} for p in prompts], _params(max_tokens), use_tqdm=False)
    return time.perf_counter() - start


def speed(llm, prompts: list[list[int]], *, tokens: int = 32, batch_sizes=(16, 64), rounds: int = 3) -> dict:
    """Decode latency at batch 1 (seconds per generated token, first token excluded), output throughput with
    ``batch_sizes`` concurrent requests (tokens per second), and prefill throughput (prompt tokens per second, all
    prompts at once, one output token each). Medians of ``rounds``."""
    def median(fn):
        return statistics.median(fn() for _ in range(rounds))

    def batch(n):
        return [prompts[i % len(prompts)] for i in range(n)]

    _timed(llm, batch(max(batch_sizes)), 4)  # warm-up: every batch shape the scheduler will see
    first = median(lambda: _timed(llm, prompts[:1], 1))
    full = median(lambda: _timed(llm, prompts[:1], tokens + 1))
    prefill = median(lambda: _timed(llm, prompts, 1))
    return {"decode_s_per_token": (full - first) / tokens,
            "throughput_tokens_per_s": {str(b): b * tokens / median(lambda b=b: _timed(llm, batch(b), tokens))
                                        for b in batch_sizes},
            "prefill_tokens_per_s": sum(map(len, prompts)) / prefill, "rounds": rounds, "tokens": tokens}


def weight_bytes(path: str | Path, dtype: str = "float32") -> int:
    """Bytes of the weights the engine holds: every tensor in the checkpoint's safetensors, in ``dtype``."""
    from safetensors import safe_open

    size = torch.tensor([], dtype=getattr(torch, dtype)).element_size()
    total = 0
    for file in sorted(Path(path).glob("*.safetensors")):
        with safe_open(str(file), "pt") as f:
            total += sum(math.prod(f.get_slice(key).get_shape()) for key in f.keys())
    return total * size


def kv_capacity(llm) -> dict:
    """The KV cache vLLM allocated: blocks, tokens per block, and the tokens it holds."""
    cache = llm.llm_engine.vllm_config.cache_config
    blocks = cache.num_gpu_blocks
    return {"blocks": blocks, "block_size": cache.block_size,
            "tokens": blocks * cache.block_size if blocks is not None else None}


def serve_checkpoints(checkpoints: dict[str, str | Path], prompts: list[list[int]], *, reference: str | None = None,
                      dtype: str = "float32", tokens: int = 32, batch_sizes=(16, 64), rounds: int = 3,
                      tensor_parallel_size: int = 1, check_prompts: int = 4, engine_args: dict | None = None,
                      progress=print) -> dict:
    """Serve each checkpoint with vLLM in turn and measure it; with ``reference`` (one of the names) add each
    one's ratios against it. Also checks each checkpoint's greedy continuations of the first ``check_prompts``
    prompts against air_ft's transformers path (``agreement``). Returns ``{name: figures}``."""
    figures: dict[str, dict] = {}
    for name, path in checkpoints.items():
        progress(f"[air-ft] vLLM: serve {name} ({path})")
        start = time.perf_counter()
        with engine(path, dtype=dtype, tensor_parallel_size=tensor_parallel_size, **(engine_args or {})) as llm:
            started = time.perf_counter() - start
            served = greedy(llm, prompts[:check_prompts], tokens)
            fig = {"path": str(path), "start_s": started, **speed(llm, prompts, tokens=tokens,
                                                                   batch_sizes=batch_sizes, rounds=rounds),
                   "weight_bytes": weight_bytes(path, dtype), "kv_cache": kv_capacity(llm),
                   "tensor_parallel_size": tensor_parallel_size}
        fig["agreement"] = agreement(served, reference_greedy(path, prompts[:check_prompts], tokens, dtype))
        figures[name] = fig
    if reference is not None and reference in figures:
        base = figures[reference]
        for fig in figures.values():
            fig["vs_reference"] = {
                "decode_latency": fig["decode_s_per_token"] / base["decode_s_per_token"],
                "throughput": {b: v / base["throughput_tokens_per_s"][b]
                               for b, v in fig["throughput_tokens_per_s"].items()},
                "prefill": fig["prefill_tokens_per_s"] / base["prefill_tokens_per_s"],
                "weight_bytes": fig["weight_bytes"] / base["weight_bytes"]}
    return figures


def serve_recipe(recipe, checkpoints: dict[str, Path | None], dense, eval_texts: dict[str, str], out: Path) -> dict:
    """A study's ``eval.serve`` stage: :func:`serve_checkpoints` with the recipe's ``eval.serve_*`` settings, on
    prompts drawn from its evaluation texts; a ``None`` checkpoint is the dense model, written to ``out/dense``
    when it has no directory vLLM can read."""
    model, tok = dense
    ev, m = recipe.eval, recipe.model
    paths = {name: path or dense_directory(m.name_or_path, m.gguf_file, model, tok, out / "dense")
             for name, path in checkpoints.items()}
    prompts = prompts_from_texts(tok, eval_texts, ev.serve_prompt_len)
    return serve_checkpoints(paths, prompts, reference="dense" if "dense" in paths else None, dtype=m.dtype,
                             tokens=ev.serve_tokens, batch_sizes=tuple(ev.serve_batch_sizes), rounds=ev.serve_rounds,
                             tensor_parallel_size=ev.serve_tensor_parallel, engine_args=ev.serve_engine)


def prompts_from_texts(tok, texts: dict[str, str], length: int, count: int = 16) -> list[list[int]]:
    """``count`` token-id prompts of ``length`` tokens, drawn evenly from the texts in turn."""
    streams = [tok(text, add_special_tokens=False)["input_ids"] for text in texts.values() if text]
    streams = [s for s in streams if len(s) >= length]
    if not streams:
        from air_ft.errors import DataError

        raise DataError(f"no evaluation text holds {length} tokens for the vLLM prompts; lower eval.serve_prompt_len")
    prompts = []
    for i in range(count):
        ids = streams[i % len(streams)]
        slot, slots = i // len(streams), -(-count // len(streams))
        start = (len(ids) - length) * slot // max(slots - 1, 1)
        prompts.append(list(ids[start:start + length]))
    return prompts


def dense_directory(name_or_path: str, gguf_file: str | None, model, tok, out: str | Path) -> Path:
    """A directory vLLM can serve the dense model from: the model's own when it is a local Hugging Face checkpoint,
    else the loaded (e.g. GGUF-dequantized) model written there with ``save_pretrained``."""
    from air_ft.assets import resolve_asset
    from air_ft.files import atomic_dir

    local = Path(resolve_asset(name_or_path))
    if gguf_file is None and (local / "config.json").is_file() and any(local.glob("*.safetensors")):
        return local
    out = Path(out)
    if not (out / "config.json").is_file():
        with atomic_dir(out) as tmp:
            model.save_pretrained(tmp, safe_serialization=True)
            tok.save_pretrained(tmp)
    return out
