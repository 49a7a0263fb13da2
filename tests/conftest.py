"""Shared test setup: offline hubs, quiet W&B, GPU tests skipped without a GPU."""

from __future__ import annotations

import os

import pytest

# The session fixture `slurm_cluster` (starts/stops a local single-node SLURM cluster; tests/slurm_cluster.py).
pytest_plugins = ["slurm_cluster"]

# No machine here reaches a model hub; make transformers/huggingface_hub fail fast instead of retrying.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _interpret_triton_without_gpu() -> None:
    """No GPU: Triton kernels (tokenbench.kv_decode_triton) run in Triton's interpreter on CPU tensors. The
    switch is read when triton.language is imported, so it is set here, before any test imports it."""
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")


_interpret_triton_without_gpu()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
