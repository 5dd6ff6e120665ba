"""Deprecated: the pipeline moved to :mod:`air_ft.pipeline`. These names keep working for one release, with a
``DeprecationWarning`` naming where each one lives now."""

from __future__ import annotations

import dataclasses
import importlib
import warnings

_MOVED = {
    "run_study": ("air_ft.pipeline.execute", "run_study"),
    "check_study": ("air_ft.pipeline.plan", "check_study"),
    "lora_budget": ("air_ft.pipeline.plan", "lora_budget"),
    "run_merge": ("air_ft.pipeline.commands", "merge"),
    "run_eval": ("air_ft.pipeline.commands", "evaluate"),
    "evaluate_model": ("air_ft.pipeline.commands", "evaluate_model"),
    "load_any": ("air_ft.pipeline.commands", "load_any"),
    "adapter_base": ("air_ft.pipeline.commands", "adapter_base"),
    "texts": ("air_ft.pipeline.commands", "texts"),
    "save_resolved": ("air_ft.pipeline.provenance", "save_resolved"),
    "run_metadata": ("air_ft.pipeline.provenance", "run_metadata"),
    "STAGE_MARKER": ("air_ft.pipeline.cache", "STAGE_MARKER"),
}


def run_compress(recipe, dense=None) -> dict:
    """Deprecated: :func:`air_ft.pipeline.commands.compress` (which returns a :class:`CompressRun`)."""
    from air_ft.pipeline import commands

    warnings.warn("air_ft.stages.run_compress moved to air_ft.pipeline.commands.compress", DeprecationWarning,
                  stacklevel=2)
    return dataclasses.asdict(commands.compress(recipe, dense))


def run_train(recipe, callbacks=None) -> dict:
    """Deprecated: :func:`air_ft.pipeline.commands.train` (which returns a :class:`TrainRun`)."""
    from air_ft.pipeline import commands

    warnings.warn("air_ft.stages.run_train moved to air_ft.pipeline.commands.train", DeprecationWarning,
                  stacklevel=2)
    return dataclasses.asdict(commands.train(recipe, callbacks))


def step_tokens(train, num_processes: int = 1) -> int:
    """Deprecated: ``TrainConfig.step_tokens``."""
    warnings.warn("air_ft.stages.step_tokens moved to TrainConfig.step_tokens", DeprecationWarning, stacklevel=2)
    return train.step_tokens(num_processes)


def __getattr__(name: str):
    if name not in _MOVED:
        raise AttributeError(f"module 'air_ft.stages' has no attribute {name!r}")
    module, attr = _MOVED[name]
    warnings.warn(f"air_ft.stages.{name} moved to {module}.{attr}", DeprecationWarning, stacklevel=2)
    return getattr(importlib.import_module(module), attr)
