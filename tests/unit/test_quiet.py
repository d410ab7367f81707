"""runner.quiet: the notices a command silences at its entry, also for libraries imported before it."""

from __future__ import annotations

import subprocess
import sys

CHECK = """
import transformers, huggingface_hub.utils as hub
from transformers.utils import logging as hf_logging
assert hf_logging.is_progress_bar_enabled() and not hub.are_progress_bars_disabled()
from runner.quiet import quiet_libraries
quiet_libraries()
from mlflow.environment_variables import MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR as mlflow_bar
print(hf_logging.is_progress_bar_enabled(), hub.are_progress_bars_disabled(), hf_logging.get_verbosity(), mlflow_bar.get())
"""


def test_progress_bars_of_libraries_imported_before_are_turned_off():
    """transformers' "Loading weights" bar (one per model built) reads a flag set at its import: a library
    imported before quiet_libraries() (as in a sweep, whose callbacks run before the first job) is told."""
    env = {
        k: v
        for k, v in __import__("os").environ.items()
        if k not in ("HF_HUB_DISABLE_PROGRESS_BARS", "TRANSFORMERS_VERBOSITY", "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR")
    }
    out = subprocess.run([sys.executable, "-c", CHECK], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["False", "True", "40", "False"]  # 40: logging.ERROR
