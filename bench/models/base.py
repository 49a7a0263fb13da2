"""The base every model entry derives from, and what loading one returns."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar


@dataclass
class LoadedModel:
    """A model ready to run: the torch module, its tokenizer or processor, and facts the harness records."""

    model: Any
    tokenizer: Any = None
    device: str = "cpu"
    dtype: str = "float32"
    weights_bytes: int = 0
    source: str = ""  # where the weights came from (hub id, local path, GGUF cache, random init)
    info: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def wrap(cls, model: Any, tokenizer: Any, device: str, dtype: Any, source: str,
             info: dict[str, Any] | None = None) -> LoadedModel:
        """A loaded torch model with its weight bytes counted (tied weights once) and dtype named plainly."""
        from tokenbench.models.hf_utils import count_weight_bytes

        return cls(model=model, tokenizer=tokenizer, device=device, dtype=str(dtype).removeprefix("torch."),
                   weights_bytes=count_weight_bytes(model), source=source, info=info or {})


@dataclass
class ModelSpec:
    """A loadable model. ``families`` lists the method families that can be applied to it."""

    families: ClassVar[tuple[str, ...]] = ()
    registered_name: ClassVar[str] = ""

    def load(self) -> LoadedModel:
        raise NotImplementedError
