"""FasterVLM: keep the visual tokens the vision encoder's [CLS] token attends to most, before the projector.

Zhang et al., "[CLS] Attention is All You Need for Training-Free Visual Token Pruning: Make VLM Inference
Faster", 2024, arXiv:2412.01818. Reference: https://github.com/Theia-4869/FasterVLM —
``llava/model/multimodal_encoder/clip_encoder.py`` (``feature_select``: the attention map of the layer LLaVA
takes its features from, ``mm_vision_select_layer = -2``, [CLS] row over the patch columns) and
``llava/model/llava_arch.py`` (``encode_images``: mean over heads, top-k, an index mask that keeps the kept
tokens in their original order, applied after the projector).

Here: the [CLS] row of the feature layer's softmax attention (softmax over [CLS] + patches, as the
reference's attention map), averaged over heads, top ``n_keep``; kept tokens in spatial order.

Deviations: the reference projects all 576 tokens and masks afterwards; here the (per-token) projector runs
on the kept tokens only — the same result, less work. The attention row is computed from the layer's own
``q_proj``/``k_proj`` instead of ``output_attentions=True`` (which forces eager attention in the whole tower):
the same numbers up to rounding. LLaVA-NeXT's per-tile application is not implemented (LLaVA-1.5 only).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from tokenbench.families.vlm import VisionContext, VLMMethod
from tokenbench.registry import register_method


@register_method("fastervlm", family="vlm")
@dataclass
class FasterVLM(VLMMethod):
    """Top-``n_keep`` visual tokens by [CLS] attention at the vision feature layer."""

    requires_cls: ClassVar[bool] = True
    needs_vision_attention: ClassVar[bool] = True

    def reduce(self, ctx: VisionContext) -> torch.Tensor:
        return ctx.gather(ctx.cls_attention().topk(ctx.n_keep, dim=-1).indices)
