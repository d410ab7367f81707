"""Library notices that are not the user's to act on, silenced in one place: at a command's entry.

Importing a runner module changes nothing global; `python -m runner` (and the report, predict,
register and export commands) call `quiet_libraries()` first. The tests filter the same warnings in
pyproject.toml's pytest settings.
"""

from __future__ import annotations

import logging
import os
import sys
import warnings

# (message regex) of Python warnings
WARNINGS = (
    r".*does not have many workers.*",
    r".*smaller than the logging interval.*",
    r".*treespec, LeafSpec.*",
    r".*Checkpoint directory .* exists and is not empty.*",
    r".*overridden `transfer_batch_to_device` in `LightningModule`.*",
    r".*module\(s\) in eval mode at the start of training.*",
    r".*torch.ao.quantization is deprecated.*",
    r".*quantized tensor creation functions.*are deprecated.*",
    r".*reduce_range will be deprecated.*",
    r".*must run observer before calling calculate_qparams.*",
    r".*TypedStorage is deprecated.*",
    r".*quantize_per_tensor.*",
)
# loggers whose notices at warning level are about the library's own set-up: torchao's kernel
# libraries built for GPUs and Triton, torch's pytree registrations, Lightning's banners
LOGGERS = {
    "torchao": logging.ERROR,
    "torch.utils._pytree": logging.ERROR,
    "pytorch_lightning.utilities.rank_zero": logging.WARNING,
    "pytorch_lightning.accelerators.cuda": logging.WARNING,
    # a traceback per "database is locked" try on a shared SQLite store; the error itself is raised, and
    # runner/tracking/retry.py retries it, then fails in one line naming tracking.uri
    "mlflow.store.db.utils": logging.CRITICAL,
}


def quiet_libraries() -> None:
    """Silence the notices above for this process (a command's entry point calls it once)."""
    for message in WARNINGS:
        warnings.filterwarnings("ignore", message)
    for name, level in LOGGERS.items():
        logging.getLogger(name).setLevel(level)
    # transformers' and huggingface_hub's per-load progress bars ("Loading weights"), read at their import
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # "Downloading artifacts", read per call
    # ... and where they were imported before this call (a sweep's callbacks run before its first job)
    if "huggingface_hub" in sys.modules:
        sys.modules["huggingface_hub"].utils.disable_progress_bars()
    if "transformers" in sys.modules:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        hf_logging.set_verbosity_error()
