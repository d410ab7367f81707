"""Shared test helpers (moved from tests/contract/test_models_logged.py)."""

from __future__ import annotations

import torch

from runner.batches import split_batch


def logged_test_inputs(cfg) -> torch.Tensor:
    """The test split's inputs, in loader order, as the job saw them."""
    from runner.config import build
    from runner.data import as_source, describe_data

    dm = as_source(build(cfg.data, "data"))
    describe_data(cfg, dm)
    return torch.cat([split_batch(b)[0] for b in dm.test_dataloader()])
