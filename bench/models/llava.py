"""LLaVA-style vision-language models for the ``vlm`` family.

- ``llava``: a LLaVA checkpoint through ``AutoModelForImageTextToText`` with its ``AutoProcessor`` (default
  ``llava-hf/llava-1.5-7b-hf``: CLIP ViT-L/14-336 + Vicuna-7B, 576 visual tokens per image; a LLaVA-NeXT id
  such as ``llava-hf/llava-v1.6-vicuna-7b-hf`` loads as LLaVA-NeXT). With no hub, the local Hugging Face cache
  or a local directory is used, and a missing model fails with one line.
- ``tiny-llava``: a random-weight LLaVA built from a config (tiny CLIP vision tower with a [CLS] token, tiny
  Llama), with an offline processor (CLIP image processor from parameters, the harness's tiny BPE tokenizer
  plus an ``<image>`` token, a LLaVA-1.5-style chat template). ``architecture=llava_next`` builds a tiny
  LLaVA-NeXT instead (any-resolution tiles of the same tower). Seconds on a CPU; for tests and demos.

Both return ``LoadedModel(model, tokenizer=<the processor>)``; ``info`` holds the facts the runner needs
(visual tokens per image, the vision feature layer).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, ClassVar

from tokenbench.errors import TokenbenchError
from tokenbench.models.base import LoadedModel, ModelSpec
from tokenbench.models.hf_causal_lm import _TranslateErrors
from tokenbench.models.hf_utils import check_dtype_device, hub_offline, hub_reachable, resolve_device, resolve_dtype
from tokenbench.registry import register_model

HUB_ID = "llava-hf/llava-1.5-7b-hf"
IMAGE_TOKEN = "<image>"

# LLaVA-1.5's conversation format (vicuna_v1 without the system line), as the llava-hf chat template renders it:
# "USER: <image>\n{question} ASSISTANT:". Content is a list of {"type": "image"} / {"type": "text"} parts.
LLAVA15_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}{{ 'USER: ' }}{% else %}{{ message['role'].upper() + ': ' }}{% endif %}"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}{{ '<image>\n' }}{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "{% if message['role'] == 'user' %}{{ ' ' }}{% else %}{{ '</s>' }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)


def _check_common(name: str, dtype: str, device: str, attn: str) -> None:
    check_dtype_device(name, dtype, device)
    if attn not in ("eager", "sdpa"):
        raise TokenbenchError(f"{name}: attn_implementation must be eager or sdpa, got '{attn}'")


def model_info(model: Any) -> dict[str, Any]:
    cfg = model.config
    vc = getattr(cfg, "vision_config", None)
    if vc is None or not hasattr(vc, "image_size"):
        return {"model_type": cfg.model_type}
    n_side = vc.image_size // vc.patch_size
    extra = 1 if getattr(cfg, "vision_feature_select_strategy", "default") == "full" else 0
    return {
        "model_type": cfg.model_type,
        "vision_model_type": vc.model_type,
        "visual_tokens_per_image": n_side * n_side + extra,
        "vision_feature_layer": getattr(cfg, "vision_feature_layer", None),
        "vision_feature_select_strategy": getattr(cfg, "vision_feature_select_strategy", None),
        "num_hidden_layers": cfg.text_config.num_hidden_layers,
        "attn_implementation": getattr(cfg.text_config, "_attn_implementation", None),
    }


@register_model("llava")
@dataclass
class Llava(ModelSpec):
    """A LLaVA checkpoint loaded with ``AutoModelForImageTextToText`` + ``AutoProcessor``."""

    families: ClassVar[tuple[str, ...]] = ("vlm",)

    pretrained: str = HUB_ID  # hub id or local directory of a LlavaForConditionalGeneration checkpoint
    revision: str | None = None  # hub branch, tag or commit
    dtype: str = "auto"  # auto (bfloat16 on GPU, float32 on CPU) | float32 | bfloat16 | float16
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    attn_implementation: str = "sdpa"  # eager | sdpa

    def __post_init__(self) -> None:
        _check_common("llava", self.dtype, self.device, self.attn_implementation)
        if not self.pretrained:
            raise TokenbenchError("llava: set model.pretrained to a hub id or a local directory")

    def load(self) -> LoadedModel:
        from transformers import AutoModelForImageTextToText, AutoProcessor

        device = resolve_device(self.device)
        dtype = resolve_dtype(self.dtype, device)
        kwargs: dict[str, Any] = {"revision": self.revision} if self.revision else {}
        source = f"hub:{self.pretrained}"
        if hub_offline() or not hub_reachable():
            kwargs["local_files_only"] = True
            source = f"hub-cache:{self.pretrained}"
        with _TranslateErrors("llava", self.pretrained, kwargs):
            processor = AutoProcessor.from_pretrained(self.pretrained, **kwargs)
            model = AutoModelForImageTextToText.from_pretrained(
                self.pretrained, dtype=dtype, attn_implementation=self.attn_implementation,
                **({"device_map": {"": device}} if device.startswith("cuda") else {}), **kwargs)
        if not device.startswith("cuda"):  # on a GPU device_map placed it already
            model = model.to(device)
        model = model.eval()
        return LoadedModel.wrap(model, processor, device, dtype, source=source, info=model_info(model))


@register_model("tiny-llava")
@dataclass
class TinyLlava(ModelSpec):
    """A LLaVA-1.5-architecture model with random weights: CLIP vision tower ([CLS] + patches, features from
    the penultimate layer, [CLS] dropped) → 2-layer MLP projector → Llama."""

    families: ClassVar[tuple[str, ...]] = ("vlm",)

    architecture: str = "llava"  # llava (LLaVA-1.5) | llava_next (any-resolution tiles, newline tokens)
    image_size: int = 64  # vision input side (pixels)
    patch_size: int = 8  # (image_size / patch_size)^2 visual tokens per image
    vision_layers: int = 3  # CLIP encoder layers (features from the penultimate one)
    vision_hidden_size: int = 32
    vision_heads: int = 4
    num_hidden_layers: int = 4  # Llama decoder layers
    hidden_size: int = 64
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    intermediate_size: int = 128
    seed: int = 0  # weight initialisation seed
    dtype: str = "float32"
    device: str = "cpu"
    attn_implementation: str = "sdpa"  # eager | sdpa

    def __post_init__(self) -> None:
        _check_common("tiny-llava", self.dtype, self.device, self.attn_implementation)
        if self.architecture not in ("llava", "llava_next"):
            raise TokenbenchError(f"tiny-llava: architecture must be llava or llava_next, got '{self.architecture}'")
        if self.image_size % self.patch_size:
            raise TokenbenchError("tiny-llava: image_size must be a multiple of patch_size")
        if self.num_attention_heads % self.num_key_value_heads:
            raise TokenbenchError("tiny-llava: num_attention_heads must be a multiple of num_key_value_heads")

    def load(self) -> LoadedModel:
        import torch
        from transformers import (
            CLIPVisionConfig,
            LlamaConfig,
            LlavaConfig,
            LlavaForConditionalGeneration,
            LlavaNextConfig,
            LlavaNextForConditionalGeneration,
        )

        next_ = self.architecture == "llava_next"
        processor = tiny_processor(self.image_size, self.patch_size, next_)
        tok = processor.tokenizer
        vision = CLIPVisionConfig(
            hidden_size=self.vision_hidden_size, intermediate_size=2 * self.vision_hidden_size,
            num_hidden_layers=self.vision_layers, num_attention_heads=self.vision_heads,
            image_size=self.image_size, patch_size=self.patch_size, projection_dim=self.vision_hidden_size,
        )
        text = LlamaConfig(
            vocab_size=len(tok), hidden_size=self.hidden_size, intermediate_size=self.intermediate_size,
            num_hidden_layers=self.num_hidden_layers, num_attention_heads=self.num_attention_heads,
            num_key_value_heads=self.num_key_value_heads, max_position_embeddings=4096,
            bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
            tie_word_embeddings=False,
        )
        common = {"vision_config": vision, "text_config": text, "image_token_id": tok.convert_tokens_to_ids(IMAGE_TOKEN),
                  "vision_feature_layer": -2, "vision_feature_select_strategy": "default"}
        if next_:
            config = LlavaNextConfig(image_grid_pinpoints=grid_pinpoints(self.image_size), **common)
        else:
            config = LlavaConfig(**common)
        config._attn_implementation = self.attn_implementation
        config.text_config._attn_implementation = self.attn_implementation
        config.vision_config._attn_implementation = self.attn_implementation
        device = resolve_device(self.device)
        dtype = resolve_dtype(self.dtype, device)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            model = (LlavaNextForConditionalGeneration if next_ else LlavaForConditionalGeneration)(config)
        model = model.to(device=device, dtype=dtype).eval()
        model.generation_config.eos_token_id = tok.eos_token_id
        return LoadedModel.wrap(model, processor, device, dtype, source=f"random init (seed {self.seed})",
                                info=model_info(model))


def grid_pinpoints(side: int) -> list[list[int]]:
    """LLaVA-NeXT's resolutions (1x1 .. 2x2 tiles of the tower's input side)."""
    return [[side, side], [side, 2 * side], [2 * side, side], [2 * side, 2 * side]]


def tiny_processor(image_size: int = 64, patch_size: int = 8, llava_next: bool = False):
    """An offline ``LlavaProcessor`` (or ``LlavaNextProcessor``): CLIP preprocessing (resize shortest edge,
    centre crop, CLIP mean/std; LLaVA-NeXT: any-resolution tiles), the tiny BPE tokenizer with ``<image>``
    added, and the LLaVA-1.5 chat template."""
    from tokenbench.models.tiny import tiny_tokenizer
    from transformers import CLIPImageProcessor, LlavaNextImageProcessor, LlavaNextProcessor, LlavaProcessor

    tok = copy.deepcopy(tiny_tokenizer())  # the cached tokenizer is shared: never mutate it
    tok.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
    tok.chat_template = LLAVA15_TEMPLATE
    clip = {"image_mean": [0.48145466, 0.4578275, 0.40821073], "image_std": [0.26862954, 0.26130258, 0.27577711],
            "size": {"shortest_edge": image_size}, "crop_size": {"height": image_size, "width": image_size}}
    common = {"tokenizer": tok, "patch_size": patch_size, "vision_feature_select_strategy": "default",
              "num_additional_image_tokens": 1, "chat_template": LLAVA15_TEMPLATE, "image_token": IMAGE_TOKEN}
    if llava_next:
        images = LlavaNextImageProcessor(image_grid_pinpoints=grid_pinpoints(image_size), **clip)
        return LlavaNextProcessor(image_processor=images, **common)
    images = CLIPImageProcessor(do_center_crop=True, do_resize=True, do_normalize=True, **clip)
    return LlavaProcessor(image_processor=images, **common)
