"""Any Hugging Face causal LM (Llama, Qwen2/3, Mistral, SmolLM2, ...) from a hub id or a local directory.

Loading never hangs on an unreachable hub: when the Hub does not answer (or ``HF_HUB_OFFLINE=1``), only
the local Hugging Face cache is consulted, and a model that is not there fails with one clear line.
"""

# No ``from __future__ import annotations`` here: the registry builds the schema of a *subclass* (smollm2.py)
# in the subclass's module, so field types are kept as objects rather than strings to resolve there.
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from tokenbench.errors import TokenbenchError
from tokenbench.models.base import LoadedModel, ModelSpec
from tokenbench.models.hf_utils import (
    check_dtype_device,
    hub_endpoint,
    hub_offline,
    hub_reachable,
    resolve_device,
    resolve_dtype,
)
from tokenbench.registry import register_model

log = logging.getLogger(__name__)

ATTN_IMPLEMENTATIONS = ("eager", "sdpa", "flash_attention_2")


class HubUnavailableError(TokenbenchError):
    """The hub cannot be reached and the model is not in the local Hugging Face cache."""


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _looks_like_path(name: str) -> bool:
    """Hub ids are ``name`` or ``owner/name``; anything else (absolute, ./, ~, deeper) is a local path."""
    return (
        name.startswith(("/", ".", "~"))
        or "\\" in name
        or name.count("/") > 1
        or name.endswith(".gguf")
    )


@register_model("hf-causal-lm")
@dataclass
class HFCausalLM(ModelSpec):
    """A causal LM loaded with ``AutoModelForCausalLM.from_pretrained`` (safetensors or GGUF)."""

    families: ClassVar[tuple[str, ...]] = ("kv", "prompt")

    pretrained: str = ""  # hub id (owner/name) or local directory (or a local .gguf file)
    revision: str | None = None  # hub branch, tag or commit (hub ids only)
    gguf_file: str | None = None  # GGUF file inside `pretrained` (dequantised on load)
    dtype: str = "auto"  # auto (bfloat16 on GPU, float32 on CPU) | float32 | bfloat16 | float16
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    attn_implementation: str = "sdpa"  # eager | sdpa | flash_attention_2
    trust_remote_code: bool = False  # run modelling code shipped with the checkpoint

    def __post_init__(self) -> None:
        name = self.registered_name or "hf-causal-lm"
        if not self.pretrained:
            raise TokenbenchError(
                f"{name}: set model.pretrained to a hub id (e.g. HuggingFaceTB/SmolLM2-135M-Instruct) "
                "or a local model directory"
            )
        if self.attn_implementation not in ATTN_IMPLEMENTATIONS:
            raise TokenbenchError(
                f"{name}: unknown attn_implementation '{self.attn_implementation}' "
                f"(use {', '.join(ATTN_IMPLEMENTATIONS)})"
            )
        check_dtype_device(name, self.dtype, self.device)

    # --- loading -------------------------------------------------------------------------------------

    def load(self) -> LoadedModel:
        device = resolve_device(self.device)
        dtype = resolve_dtype(self.dtype, device)
        location, kwargs, source = self._locate()
        return self._load_from(location, kwargs, source, device, dtype)

    def _locate(self) -> tuple[str, dict[str, Any], str]:
        """Where to load from: (name or directory, extra from_pretrained kwargs, source description)."""
        name = self.registered_name or "hf-causal-lm"
        path = Path(self.pretrained).expanduser()
        if path.exists() or _looks_like_path(self.pretrained):
            if not path.exists():
                raise TokenbenchError(f"{name}: local model path '{self.pretrained}' does not exist")
            kwargs: dict[str, Any] = {}
            if path.is_file():
                if path.suffix != ".gguf":
                    raise TokenbenchError(
                        f"{name}: '{self.pretrained}' is a file; give a model directory or a .gguf file"
                    )
                if self.gguf_file and self.gguf_file != path.name:
                    raise TokenbenchError(f"{name}: pretrained is a .gguf file, so leave gguf_file empty")
                path, kwargs["gguf_file"] = path.parent, path.name
            elif self.gguf_file:
                if not (path / self.gguf_file).is_file():
                    raise TokenbenchError(f"{name}: GGUF file '{self.gguf_file}' not found in '{path}'")
                kwargs["gguf_file"] = self.gguf_file
            elif not (path / "config.json").is_file():
                raise TokenbenchError(
                    f"{name}: '{path}' has no config.json (not a saved transformers model; "
                    "for a GGUF file set gguf_file)"
                )
            return str(path), kwargs, f"local:{path}"

        kwargs = {"revision": self.revision} if self.revision else {}
        if self.gguf_file:
            kwargs["gguf_file"] = self.gguf_file
        if hub_offline() or not hub_reachable():
            why = "HF_HUB_OFFLINE is set" if hub_offline() else f"{hub_endpoint()} is unreachable"
            log.debug("%s: %s; looking for %s in the local Hugging Face cache", name, why, self.pretrained)
            kwargs["local_files_only"] = True
            return self.pretrained, kwargs, f"hub-cache:{self.pretrained}"
        return self.pretrained, kwargs, f"hub:{self.pretrained}"

    def _load_from(
        self, location: str, kwargs: dict[str, Any], source: str, device: str, dtype: Any
    ) -> LoadedModel:
        from transformers import AutoModelForCausalLM

        tokenizer = self._load_tokenizer(location, kwargs)
        model_kwargs = dict(kwargs, dtype=dtype, attn_implementation=self.attn_implementation)
        if device.startswith("cuda"):
            model_kwargs["device_map"] = {"": device}  # load straight onto the GPU
        with self._errors(location, kwargs):
            model = AutoModelForCausalLM.from_pretrained(
                location, trust_remote_code=self.trust_remote_code, **model_kwargs
            )
        if not device.startswith("cuda"):
            model = model.to(device)
        model.eval()
        if model.generation_config is not None and model.generation_config.pad_token_id is None:
            model.generation_config.pad_token_id = tokenizer.pad_token_id
        config = model.config
        text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
        info = {
            "model_type": getattr(config, "model_type", None),
            "num_hidden_layers": getattr(text_config, "num_hidden_layers", None),
            "num_attention_heads": getattr(text_config, "num_attention_heads", None),
            "num_key_value_heads": getattr(text_config, "num_key_value_heads", None),
            "vocab_size": getattr(text_config, "vocab_size", None),
            "attn_implementation": getattr(config, "_attn_implementation", self.attn_implementation),
        }
        return LoadedModel.wrap(model, tokenizer, device, dtype, source=source, info=info)

    def _load_tokenizer(self, location: str, kwargs: dict[str, Any]):
        from transformers import AutoTokenizer

        with self._errors(location, kwargs):
            tokenizer = AutoTokenizer.from_pretrained(
                location, trust_remote_code=self.trust_remote_code, **kwargs
            )
        prepare_tokenizer(tokenizer)
        return tokenizer

    def _errors(self, location: str, kwargs: dict[str, Any]) -> "_TranslateErrors":
        return _TranslateErrors(self.registered_name or "hf-causal-lm", location, kwargs)


def prepare_tokenizer(tokenizer) -> None:
    """Left padding (batched generation) and a pad token (the EOS token when the model has none)."""
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise TokenbenchError("the tokenizer has neither a pad nor an EOS token")
        tokenizer.pad_token = tokenizer.eos_token


class _TranslateErrors:
    """Turn the long exceptions of transformers / huggingface_hub into one TokenbenchError line."""

    def __init__(self, name: str, location: str, kwargs: dict[str, Any]) -> None:
        self.name, self.location, self.kwargs = name, location, kwargs

    def __enter__(self) -> None:
        return None

    def __exit__(self, exc_type, exc, tb) -> bool:
        if exc is None or isinstance(exc, TokenbenchError):
            return False
        from huggingface_hub.errors import (
            GatedRepoError,
            LocalEntryNotFoundError,
            OfflineModeIsEnabled,
            RepositoryNotFoundError,
            RevisionNotFoundError,
        )

        where = f"{self.name}: cannot load '{self.location}'"
        if isinstance(exc, GatedRepoError):
            msg = f"{where}: the repository is gated; accept its terms on the hub and log in (hf auth login)"
        elif isinstance(exc, RepositoryNotFoundError):
            msg = f"{where}: no such model on the hub (or it is private and you are not logged in)"
        elif isinstance(exc, RevisionNotFoundError):
            msg = f"{where}: revision '{self.kwargs.get('revision')}' does not exist"
        elif self.kwargs.get("local_files_only") and isinstance(
            exc, (OSError, LocalEntryNotFoundError, OfflineModeIsEnabled)
        ):
            why = "HF_HUB_OFFLINE is set" if hub_offline() else f"the hub ({hub_endpoint()}) is unreachable"
            cache = os.environ.get("HF_HUB_CACHE") or os.environ.get("HF_HOME") or "~/.cache/huggingface"
            raise HubUnavailableError(
                f"{where}: {why} and the model is not in the local Hugging Face cache ({cache}); "
                "download it on a machine with access, or point model.pretrained at a local directory"
            ) from exc
        elif isinstance(exc, (OSError, ValueError, ImportError, KeyError)):
            msg = f"{where}: {type(exc).__name__}: {_first_line(exc)}"
        else:
            return False  # an unexpected failure keeps its traceback
        raise TokenbenchError(msg) from exc
