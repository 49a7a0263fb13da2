"""The runner of the ``vlm`` family: image + question through a LLaVA-style model with a visual-token method
applied, greedy decoding, and the measurements of DESIGN.md ("Measurement protocol").

Prompt: the sample's image (``sample.image``: a PIL image, an array, a path, ``skimage:<name>``, or a
zero-argument callable returning one of those) and ``sample.question`` (the task's question with its
short-answer instruction) as one user turn ``[image, text]`` through the processor's chat template, or, with
the template off, ``"<image>\\n" + question``; the processor expands ``<image>`` into the model's visual
tokens and preprocesses the image.

Prefill (``tokenbench.families.vlm.VLMSession.prefill``): vision tower, the method, projector, spliced prompt
embeddings, language-model prefill (an in-LM method cuts the sequence at its layer). Decoding: greedy over a
``DynamicCache`` with explicit positions, one token at a time.

Timing (milliseconds, CUDA events on a GPU, ``perf_counter`` on a CPU; the processor's preprocessing is
outside): ``prefill_ms`` (vision tower, the method, projector and the language-model prefill, up to the last
prompt position's logits: the method's own work is inside), ``ttft_ms`` (to the first token), ``tpot_ms``
(mean decode step over ``measure.fixed_output_tokens`` tokens, EOS ignored), ``e2e_ms`` (to the
prediction's natural end). Memory: peak above the start of the generation (``tokenbench.measure``).
Compression: ``visual_tokens_in``, ``visual_tokens_kept``, ``achieved_keep_ratio``, the prune layer and
the tokens entering every decoder layer (read from the tensors).
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import torch
from tokenbench.config import MeasureSettings
from tokenbench.errors import TokenbenchError
from tokenbench.families.vlm import VLMMethod, VLMSession
from tokenbench.lm import GenerationOutput, _eos_ids, prediction_lengths
from tokenbench.measure import Timer, measured_repeats, summarize_repeats
from tokenbench.models.hf_utils import cache_kwarg

log = logging.getLogger(__name__)


def load_image(image: Any) -> Any:
    """A PIL RGB image from what a sample carries."""
    from PIL import Image

    if callable(image) and not isinstance(image, Image.Image):
        image = image()
    if isinstance(image, str):
        if image.startswith("skimage:"):
            from skimage import data

            image = getattr(data, image.split(":", 1)[1])()
        else:
            image = Image.open(image)
    if isinstance(image, np.ndarray):
        if image.dtype == bool:
            image = image.astype(np.uint8) * 255
        if image.ndim == 2:
            image = np.stack([image] * 3, axis=-1)
        image = Image.fromarray(image.astype(np.uint8))
    if not isinstance(image, Image.Image):
        raise TokenbenchError(f"cannot read an image from {type(image).__name__}")
    return image.convert("RGB")


class VLMRunner:
    """Runs image-question samples through a LLaVA model with a vlm method, and measures them."""

    def __init__(self, loaded: Any, method: VLMMethod | None = None, measure: MeasureSettings | None = None):
        if method is None:
            from tokenbench.registry import METHODS, load_all

            load_all()
            method = METHODS.get("none", "vlm").cls()
        if not isinstance(method, VLMMethod):
            raise TokenbenchError(f"VLMRunner runs vlm-family methods; got '{getattr(method, 'name', method)}'")
        self.loaded, self.model, self.processor = loaded, loaded.model, loaded.tokenizer
        self.device = torch.device(loaded.device)
        self.method = method
        self.measure = measure if measure is not None else MeasureSettings()
        if int(getattr(self.measure, "batch_size", 1) or 1) != 1:
            raise TokenbenchError("the vlm runner takes one image prompt at a time (measure.batch_size=1)")
        self.session = VLMSession(method, self.model)
        tok = getattr(self.processor, "tokenizer", self.processor)
        self.tokenizer = tok
        self.eos_ids = _eos_ids(tok, self.model)
        self._eos = torch.tensor(self.eos_ids or [-1], device=self.device, dtype=torch.long)
        self._warmed = False
        self._cache_kw = cache_kwarg(self.model.model.language_model)

    # --- prompt ------------------------------------------------------------------------------------------

    def build_inputs(self, sample: Any, use_chat_template: bool = True) -> dict[str, torch.Tensor]:
        image = getattr(sample, "image", None)
        image = load_image(sample.meta.get("image") if image is None else image)
        question = (sample.context or "") + (sample.question or "")
        if use_chat_template and getattr(self.processor, "chat_template", None):
            msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
            text = self.processor.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
        else:
            text = "<image>\n" + question
        inputs = self.processor(images=image, text=text, return_tensors="pt")
        out = {"input_ids": inputs["input_ids"].to(self.device),
               "pixel_values": inputs["pixel_values"].to(self.device), "text": text}
        if inputs.get("image_sizes") is not None:  # LLaVA-NeXT's any-resolution tiling
            out["image_sizes"] = inputs["image_sizes"].to(self.device)
        return out

    # --- generation --------------------------------------------------------------------------------------

    def prefill_logits(self, inputs: dict[str, Any]) -> tuple[torch.Tensor, dict[str, Any]]:
        """The last prompt position's logits with the method applied (no decoding), and its stats."""
        from transformers import DynamicCache

        with torch.inference_mode():
            cache = DynamicCache(config=self.model.config.text_config)
            res = self.session.prefill(inputs["input_ids"], inputs["pixel_values"], cache, self._cache_kw,
                                       inputs.get("image_sizes"))
        return res.logits.float(), res.stats

    def generate(self, inputs: dict[str, Any], max_new_tokens: int, fixed_tokens: int = 0) -> dict[str, Any]:
        from transformers import DynamicCache

        lm = self.model.model.language_model
        steps = max(1, int(max_new_tokens), int(fixed_tokens))
        timer = Timer(self.device)
        tokens: list[torch.Tensor] = []
        with torch.inference_mode():
            cache = DynamicCache(config=self.model.config.text_config)
            timer.synchronize()
            t0 = timer.stamp()
            res = self.session.prefill(inputs["input_ids"], inputs["pixel_values"], cache, self._cache_kw,
                                       inputs.get("image_sizes"))
            t_prefill = timer.stamp()
            tok = res.logits.argmax(dim=-1)
            tokens.append(tok)
            stamps = [timer.stamp()]
            pos = res.next_position
            stop: int | None = None
            with self.session.decoding():
                n = 1
                while n < steps and (stop is None or n < fixed_tokens):
                    if stop is None and bool(torch.isin(tok, self._eos).any()):
                        stop = n
                        if n >= fixed_tokens:
                            break
                    out = lm(input_ids=tok.view(1, 1), position_ids=torch.tensor([[pos]], device=self.device),
                             use_cache=True, **{self._cache_kw: cache})
                    tok = self.model.lm_head(out.last_hidden_state[:, -1]).argmax(dim=-1)
                    tokens.append(tok)
                    pos += 1
                    n += 1
                    stamps.append(timer.stamp())
            timer.synchronize()
        generated = torch.cat(tokens)
        ids = generated.tolist()
        length = prediction_lengths(generated.view(1, -1), self._eos, max(1, int(max_new_tokens)))[0]
        n_fixed = min(len(stamps), fixed_tokens) if fixed_tokens >= 2 else length
        tpot = timer.elapsed_ms(stamps[0], stamps[n_fixed - 1]) / (n_fixed - 1) if n_fixed >= 2 else None
        latency = {
            "prefill_ms": timer.elapsed_ms(t0, t_prefill),
            "ttft_ms": timer.elapsed_ms(t0, stamps[0]),
            "tpot_ms": tpot,
            "e2e_ms": timer.elapsed_ms(t0, stamps[length - 1]),
        }
        return {"ids": ids[:length], "latency": latency, "stats": res.stats, "n_prompt": int(inputs["input_ids"].shape[1])}

    # --- one sample, measured ----------------------------------------------------------------------------

    def run(self, sample: Any, use_chat_template: bool = True) -> GenerationOutput:
        inputs = self.build_inputs(sample, use_chat_template)
        max_new = max(1, int(getattr(sample, "max_new_tokens", 16) or 1))
        fixed = max(0, int(self.measure.fixed_output_tokens))
        gens, peaks = measured_repeats(lambda: self.generate(inputs, max_new, fixed), self.device,
                                       self.measure.repeats, 0 if self._warmed else self.measure.warmup)
        self._warmed = True
        g = gens[0]
        stats = dict(g["stats"])
        return GenerationOutput(
            text=self.tokenizer.decode(g["ids"], skip_special_tokens=True).strip(),
            n_prompt_tokens=g["n_prompt"],
            n_context_tokens=stats["visual_tokens_in"],
            n_generated=len(g["ids"]),
            latency=summarize_repeats([x["latency"] for x in gens]),
            memory=peaks,
            compression=stats,
            token_ids=g["ids"],
        )
