"""The stage cache: one directory per stage of a study, reused while its key holds.

A stage directory holds ``.stage-key`` (the key it was begun with) while the stage runs and ``stage.json`` (the
key, the result, the seconds it took, the git commit) once it finished, written last and atomically. A rerun
reuses a directory whose ``stage.json`` holds the same key, resumes in a directory begun with the same key
(training continues from its Trainer checkpoints) and clears a directory begun with another key.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from air_ft.files import write_json, write_text
from air_ft.pipeline.provenance import git_commit

__all__ = ["STAGE_MARKER", "StageDir", "stage_key"]

STAGE_MARKER = "stage.json"


def stage_key(*parts) -> str:
    """A short hash of JSON-serializable parts (dict order does not matter)."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


@dataclass
class StageDir:
    """One stage directory: reused when its marker holds ``key``, otherwise (re)done."""

    path: Path
    key: str

    def cached(self) -> dict | None:
        """The finished stage's result, or None when it has not finished with this key."""
        marker = self.path / STAGE_MARKER
        if marker.exists():
            meta = json.loads(marker.read_text())
            if meta.get("key") == self.key:
                return meta["result"]
        return None

    def begin(self) -> None:
        """Clear a directory left by other inputs; keep a same-key unfinished one (training resumes from it)."""
        keyfile = self.path / ".stage-key"
        if self.path.exists() and (not keyfile.exists() or keyfile.read_text() != self.key):
            shutil.rmtree(self.path)
        self.path.mkdir(parents=True, exist_ok=True)
        write_text(keyfile, self.key)
        (self.path / STAGE_MARKER).unlink(missing_ok=True)

    def finish(self, result: dict, seconds: float) -> dict:
        """Write the marker (last: it is what makes the stage count as finished) and return ``result``."""
        write_json(self.path / STAGE_MARKER, {"key": self.key, "seconds": seconds,
                                              "finished": time.strftime("%Y-%m-%d %H:%M:%S"),
                                              "git_commit": git_commit(), "result": result})
        return result
