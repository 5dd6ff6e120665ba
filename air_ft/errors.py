"""The errors that mean "this input cannot be used as given".

Every class here derives from :class:`AirFtError`, and its message says what to change. The command line prints
such an error as one line and exits with status 2 (:mod:`air_ft.cli`). Any other exception is a bug in air_ft:
it keeps its traceback and exits with status 1.

Each class also derives from the built-in type that callers of the library caught before it existed
(``ValueError``, ``FileNotFoundError``, ``RuntimeError``), so ``except ValueError`` around a recipe still works.
This module imports nothing, so the pure math (:mod:`air_ft.linalg`) can raise these errors without importing
any configuration.
"""

from __future__ import annotations

__all__ = ["AirFtError", "RecipeError", "DataError", "AssetError", "CheckpointError", "CalibrationError",
           "WhiteningError", "NativeUnavailable", "TaskError"]


class AirFtError(Exception):
    """Input that cannot be used as given. The message says what to change."""


class RecipeError(AirFtError, ValueError):
    """A recipe key, an option or an argument value that cannot be used as written."""


class DataError(AirFtError, ValueError):
    """Text or token data that cannot be used: too short, empty, a bad slice or pattern."""


class AssetError(AirFtError, FileNotFoundError):
    """A path, checkpoint, model file or ``pypi://`` asset that is missing or cannot be fetched."""


class CheckpointError(AirFtError, RuntimeError):
    """A checkpoint or adapter that exists but does not fit: wrong shapes, missing tensors, broken values."""


class CalibrationError(AirFtError, RuntimeError):
    """Calibration that cannot produce statistics, for example a loss that is NaN or Inf."""


class WhiteningError(AirFtError, RuntimeError):
    """A Gram matrix that no damping rung can factor, or factors that are not finite."""


class NativeUnavailable(AirFtError, RuntimeError):
    """The fused C kernel that was asked for cannot be built or loaded here."""


class TaskError(RecipeError):
    """A zero-shot task that is unknown, or whose documents cannot be found."""
