"""timm Vision Transformers for the ``vit`` family: any timm ViT by name, presets for the ToMe README's
models, and a tiny random one for tests and CPU demos.

``pretrained=true`` downloads timm's weights from the Hugging Face hub (the default a user wants for ImageNet
accuracy); with no hub, ``checkpoint_path`` loads a local file, and the default ``pretrained=false`` builds
the architecture with random weights (enough for speed and FLOPs, meaningless for accuracy).

How the model runs is part of its entry, and so of the run key: ``amp`` (autocast dtype; the ToMe protocol is
float16 autocast over float32 weights on a GPU), ``execution`` (eager, ``torch.compile``, or CUDA graphs
captured once per input shape) and ``fused_attn`` (timm's fused SDPA attention, or its explicit softmax path
as the official ToMe patch uses).
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from typing import Any, ClassVar, Optional

from tokenbench.errors import TokenbenchError
from tokenbench.models.base import LoadedModel, ModelSpec
from tokenbench.models.hf_utils import resolve_device, resolve_dtype
from tokenbench.registry import register_model

AMP = ("auto", "none", "float16", "bfloat16")
EXECUTIONS = ("eager", "compile", "cuda_graph")


def resolve_amp(amp: str, device: str) -> Optional[str]:
    """The autocast dtype name, or None for no autocast; ``auto`` is float16 on CUDA, off on a CPU."""
    if amp == "auto":
        return "float16" if device.startswith("cuda") else None
    return None if amp == "none" else amp


@dataclass
class TimmViTSpec(ModelSpec):
    """What every timm ViT entry shares: device, precision, execution mode; subclasses build the module."""

    families: ClassVar[tuple[str, ...]] = ("vit",)

    device: str = "auto"  # auto | cpu | cuda | cuda:N
    dtype: str = "float32"  # weight dtype: float32 | float16 | bfloat16 | auto
    amp: str = "auto"  # autocast dtype: auto (float16 on CUDA, off on CPU) | none | float16 | bfloat16
    execution: str = (
        "eager"  # eager | compile (torch.compile) | cuda_graph (captured per input shape, CUDA only)
    )
    fused_attn: bool = (
        True  # timm's fused SDPA attention; false: its explicit softmax path (as the ToMe patch)
    )

    def __post_init__(self) -> None:
        name = self.registered_name or type(self).__name__
        if self.amp not in AMP:
            raise TokenbenchError(f"{name}: unknown amp '{self.amp}' (use {', '.join(AMP)})")
        if self.execution not in EXECUTIONS:
            raise TokenbenchError(
                f"{name}: unknown execution '{self.execution}' (use {', '.join(EXECUTIONS)})"
            )

    def build(self, device: str, dtype: Any) -> Any:
        raise NotImplementedError

    def source(self) -> str:
        raise NotImplementedError

    def data_config(self, model: Any) -> dict[str, Any]:
        """timm's evaluation data config of the model (input size, resize/crop, interpolation, mean/std)."""
        from timm.data import resolve_model_data_config

        return dict(resolve_model_data_config(model))

    def load(self) -> LoadedModel:
        import torch

        from tokenbench.families.vit import input_tokens

        device = resolve_device(self.device)
        dtype = resolve_dtype(self.dtype, device)
        if self.execution == "cuda_graph" and not device.startswith("cuda"):
            raise TokenbenchError(f"execution=cuda_graph needs a CUDA device (this entry runs on {device})")
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(getattr(self, "seed", 0)))
            model = self.build(device, dtype)
        model = model.to(device=device, dtype=dtype).eval()
        for module in model.modules():
            if hasattr(module, "fused_attn") and hasattr(module, "qkv"):
                module.fused_attn = bool(self.fused_attn)
        info = {
            "data_config": self.data_config(model),
            "amp": resolve_amp(self.amp, device),
            "execution": self.execution,
            "num_classes": int(getattr(model, "num_classes", 0)),
            "input_tokens": input_tokens(model),
            "architecture": type(model).__name__,
        }
        return LoadedModel.wrap(model, None, device, dtype, source=self.source(), info=info)


@register_model("timm-vit")
@dataclass
class TimmViT(TimmViTSpec):
    """Any timm ViT by name (``vit_*``, ``deit_*`` incl. distilled, AugReg tags, CLIP-style ``*_clip_*``)."""

    model_name: str = "vit_base_patch16_224.augreg_in21k_ft_in1k"  # timm model name, optionally with a tag
    pretrained: bool = False  # timm's weights from the HF hub; false: random init (speed and FLOPs only)
    checkpoint_path: Optional[str] = None  # a local timm/torch checkpoint to load instead of the hub
    num_classes: Optional[int] = None  # classifier size; None: the model's own (1000 for ImageNet heads)
    img_size: Optional[int] = None  # input resolution; None: the model's own
    seed: int = 0  # random-init seed (pretrained=false)

    def __post_init__(self) -> None:
        super().__post_init__()
        import timm

        arch = self.model_name.split(".")[0]
        if not timm.is_model(arch):
            known = timm.list_models()
            close = difflib.get_close_matches(arch, known, n=3, cutoff=0.6)
            hint = f" Closest: {', '.join(close)}" if close else ""
            raise TokenbenchError(f"{self.registered_name}: timm has no model '{arch}'.{hint}")
        if self.checkpoint_path is not None:
            from pathlib import Path

            if not Path(self.checkpoint_path).expanduser().is_file():
                raise TokenbenchError(f"{self.registered_name}: checkpoint not found: {self.checkpoint_path}")

    def source(self) -> str:
        if self.checkpoint_path:
            return f"checkpoint {self.checkpoint_path}"
        return f"timm hub weights {self.model_name}" if self.pretrained else f"random init (seed {self.seed})"

    def build(self, device: str, dtype: Any) -> Any:
        import timm

        kwargs: dict[str, Any] = {}
        if self.num_classes is not None:
            kwargs["num_classes"] = int(self.num_classes)
        if self.img_size is not None:
            kwargs["img_size"] = int(self.img_size)
        if self.checkpoint_path:
            kwargs["checkpoint_path"] = str(self.checkpoint_path)
        try:
            return timm.create_model(
                self.model_name, pretrained=bool(self.pretrained), device=device, **kwargs
            )
        except TokenbenchError:
            raise
        except Exception as exc:
            if self.pretrained:
                raise TokenbenchError(
                    f"{self.registered_name}: could not load pretrained weights for {self.model_name} "
                    f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}); without a hub, "
                    "pass checkpoint_path=<file> or pretrained=false"
                ) from None
            raise


@register_model("vit-s16")
@dataclass
class ViTS16(TimmViT):
    """ViT-S/16 AugReg (the ToMe README's ViT-S; r = 13 there)."""

    model_name: str = "vit_small_patch16_224.augreg_in21k_ft_in1k"


@register_model("vit-b16")
@dataclass
class ViTB16(TimmViT):
    """ViT-B/16 AugReg (the ToMe README's ViT-B; r = 13 and 16 there)."""

    model_name: str = "vit_base_patch16_224.augreg_in21k_ft_in1k"


@register_model("vit-l16")
@dataclass
class ViTL16(TimmViT):
    """ViT-L/16 AugReg (the ToMe README's ViT-L; r = 7 and 8 there)."""

    model_name: str = "vit_large_patch16_224.augreg_in21k_ft_in1k"


@register_model("tiny-vit")
@dataclass
class TinyViT(TimmViTSpec):
    """A tiny timm ``VisionTransformer`` (or DeiT-distilled) with random weights: no download, milliseconds
    on a CPU. For tests and demos."""

    img_size: int = 32  # input resolution
    patch_size: int = 8  # patch size ((img_size / patch_size)^2 patch tokens)
    embed_dim: int = 64  # width
    depth: int = 4  # blocks
    num_heads: int = 4  # attention heads
    num_classes: int = 10  # classifier size
    class_token: bool = True  # prepend a class token
    reg_tokens: int = 0  # register tokens after the class token
    distilled: bool = False  # DeiT-style distillation token and head (timm's VisionTransformerDistilled)
    global_pool: str = "token"  # token | avg (avg needs no class token)
    seed: int = 0  # weight initialisation seed

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.img_size % self.patch_size:
            raise TokenbenchError(
                f"tiny-vit: img_size ({self.img_size}) must be a multiple of patch_size ({self.patch_size})"
            )
        if self.embed_dim % self.num_heads:
            raise TokenbenchError(
                f"tiny-vit: embed_dim ({self.embed_dim}) must be a multiple of num_heads ({self.num_heads})"
            )
        if self.distilled and not self.class_token:
            raise TokenbenchError("tiny-vit: a distilled model needs the class token")
        if self.global_pool == "token" and not self.class_token:
            raise TokenbenchError("tiny-vit: global_pool=token needs the class token (use global_pool=avg)")

    def source(self) -> str:
        return f"random init (seed {self.seed})"

    def build(self, device: str, dtype: Any) -> Any:
        from timm.models.deit import VisionTransformerDistilled
        from timm.models.vision_transformer import VisionTransformer

        cls = VisionTransformerDistilled if self.distilled else VisionTransformer
        return cls(
            img_size=self.img_size,
            patch_size=self.patch_size,
            embed_dim=self.embed_dim,
            depth=self.depth,
            num_heads=self.num_heads,
            num_classes=self.num_classes,
            class_token=self.class_token,
            reg_tokens=self.reg_tokens,
            global_pool=self.global_pool,
        )

    def data_config(self, model: Any) -> dict[str, Any]:
        from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

        return {
            "input_size": (3, self.img_size, self.img_size),
            "interpolation": "bicubic",
            "mean": IMAGENET_DEFAULT_MEAN,
            "std": IMAGENET_DEFAULT_STD,
            "crop_pct": 0.875,
            "crop_mode": "center",
        }
