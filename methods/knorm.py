"""Knorm: keep the keys with the lowest L2 norm.

Devoto, Zhao, Scardapane, Minervini. "A Simple and Effective L2 Norm-Based Strategy for KV Cache Compression",
EMNLP 2024 (arXiv:2406.11430): a low key norm goes with high attention, so the tokens whose keys have the
largest norms are evicted. Reference code: kvpress ``KnormPress`` (https://github.com/NVIDIA/kvpress,
``kvpress/presses/knorm_press.py``); KVCache-Factory ``L2NormCluster``
(https://github.com/Zefan-Cai/KVCache-Factory, ``pyramidkv/pyramidkv_utils.py``).
Written independently.

Rule: score = ``-||k||_2`` per cached token and KV head (the cached keys are post-RoPE; RoPE rotates each pair
of dimensions, so the norm is the pre-RoPE one). Needs no attention at all.

``skip_layers``: the paper's experiments leave the first two layers uncompressed (KVCache-Factory's default
``skip_layers=[0, 1]``), kvpress compresses every layer; the default here is kvpress's (0). With
``skip_layers > 0`` those layers keep their whole segment, so the achieved keep ratio (measured and reported)
exceeds the nominal one.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from tokenbench.families.kv import KVMethod, ScoreContext
from tokenbench.registry import register_method


@register_method("knorm", family="kv")
@dataclass
class Knorm(KVMethod):
    """Low key norm = keep."""

    skip_layers: int = 0  # the lowest layers left uncompressed (the paper: 2; kvpress: 0)

    def validate(self) -> None:
        super().validate()
        self.check_int("skip_layers", 0)

    def layer_budget(self, budget: int, segment_len: int, layer_idx: int, n_layers: int) -> int:
        return segment_len if layer_idx < self.skip_layers else budget

    def score(self, ctx: ScoreContext) -> torch.Tensor:
        return -ctx.keys.float().norm(dim=-1)
