"""The pipeline: a recipe becomes a plan of stages (:mod:`.plan`), an executor runs it (:mod:`.execute`) with the
stage cache (:mod:`.cache`) and the commands (:mod:`.commands`), and every output carries its provenance
(:mod:`.provenance`). See ``docs/architecture.md``."""

from air_ft.pipeline.execute import run_study
from air_ft.pipeline.plan import Stage, check_study, plan

__all__ = ["plan", "Stage", "run_study", "check_study"]
