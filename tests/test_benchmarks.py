"""The benchmark scripts refuse nonsense options at parse time, with a message naming the option, before loading
anything (each case runs the script in a subprocess; a refusal exits with argparse's status 2)."""

import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.mark.parametrize("script,args,message", [
    ("gpu_train.py", ["--steps", "0"], "--steps must be an integer >= 1"),
    ("gpu_train.py", ["--warmup", "-1"], "--warmup must be an integer >= 0"),
    ("gpu_train.py", ["--retention", "1.2"], "--retention must lie strictly between 0 and 1"),
    ("recovery.py", ["--britannica-share", "1"], "--britannica-share must lie strictly between 0 and 1"),
])
def test_bad_benchmark_options_are_refused_before_any_work(script, args, message):
    proc = subprocess.run([sys.executable, str(BENCH / script), *args], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert message in proc.stderr
