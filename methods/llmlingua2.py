"""LLMLingua-2: prompt compression as token classification — a bidirectional encoder labels every token
"keep" or "drop", token probabilities are aggregated into word probabilities, and the most probable words are
kept.

Pan, Wu, Jiang, Xia, Luo, Zhang, Lin, Rühle, Yang, Lin, Zhao, Qiu, Zhang. "LLMLingua-2: Data Distillation
for Efficient and Faithful Task-Agnostic Prompt Compression", Findings of ACL 2024 (arXiv:2403.12968).
Reference code: https://github.com/microsoft/LLMLingua (``llmlingua/prompt_compressor.py``:
``compress_prompt_llmlingua2``, ``__chunk_context``, ``__compress``, ``__merge_token_to_word``,
``__token_prob_to_word_prob``). Written independently.

``model_path``: any local directory with a token-classification checkpoint
(``AutoModelForTokenClassification`` + its tokenizer, label 1 = keep), or a hub id — the published compressor
is ``microsoft/llmlingua-2-xlm-roberta-large-meetingbank`` (the default; it needs the hub or a local copy).
Loaded once per process per (path, device), on ``compressor_device``.

Rule, as the reference computes it:

1. the context is cut into chunks of at most ``max_seq_len - 2`` classifier tokens (room for CLS/SEP), at
   word boundaries (the reference cuts at the last ``.`` or newline token before the limit; a chunk here ends
   at the last sentence end before the limit when there is one, else at a word boundary);
2. each chunk is classified; a token's keep probability is the softmax of its logits at label 1;
3. a word's probability is the mean over its tokens (``token_to_word="mean"``); a word containing one of
   ``force_tokens`` gets probability 1 (always kept first);
4. the words with the highest probability are kept, in their original order.

Deviations: the reference keeps, **per chunk**, the words above that chunk's percentile at the target rate;
here one ranking over the whole context is cut at the budget in target tokens (``fit``), so a chunk may keep
more or less than the rate; a word is a whitespace-separated piece with the whitespace before it (the
reference rebuilds words from the classifier's word-start markers and re-joins them with the classifier's
detokeniser); no ``drop_consecutive``, ``force_reserve_digit``, ``use_context_level_filter`` or
``return_word_label``. Budget unit: one word.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tokenbench.errors import TokenbenchError
from tokenbench.families.prompt import (
    Fit,
    PromptCompressor,
    _check_device,
    assign,
    char_starts,
    resolve_compressor_device,
    shared_model,
    words,
)
from tokenbench.registry import register_method

HUB_ID = "microsoft/llmlingua-2-xlm-roberta-large-meetingbank"
_SENTENCE_END = (".", "!", "?", "\n")


def load_classifier(path: str, device: str) -> Any:
    """The token-classification checkpoint at ``path`` (a local directory or a hub id) as a ``LoadedModel``;
    one-line errors, and no retries of an unreachable hub (only its local cache is tried)."""
    import torch
    from transformers import AutoModelForTokenClassification, AutoTokenizer

    from tokenbench.models.base import LoadedModel
    from tokenbench.models.hf_causal_lm import _looks_like_path, _TranslateErrors
    from tokenbench.models.hf_utils import hub_offline, hub_reachable

    local = Path(path).expanduser()
    kwargs: dict[str, Any] = {}
    if local.exists() or _looks_like_path(path):
        if not local.exists():
            raise TokenbenchError(f"llmlingua2: cannot load '{path}': no such checkpoint directory")
        source = f"local:{local}"
    elif hub_offline() or not hub_reachable():
        kwargs["local_files_only"] = True
        source = f"hub-cache:{path}"
    else:
        source = f"hub:{path}"
    with _TranslateErrors("llmlingua2", path, kwargs):
        tok = AutoTokenizer.from_pretrained(path, **kwargs)
        model = AutoModelForTokenClassification.from_pretrained(path, dtype=torch.float32, **kwargs)
    if getattr(model.config, "num_labels", 0) < 2:
        raise TokenbenchError(f"llmlingua2: '{path}' has {model.config.num_labels} label(s); "
                              "it needs 2 (0 = drop, 1 = keep)")
    return LoadedModel.wrap(model.to(device).eval(), tok, device, torch.float32, source=source)


@register_method("llmlingua2", family="prompt")
@dataclass
class LLMLingua2(PromptCompressor):
    """Keep the words a token classifier finds most worth keeping."""

    model_path: str = HUB_ID  # local token-classification checkpoint directory, or a hub id
    compressor_device: str = "target"  # target (the target model's device) | auto | cpu | cuda | cuda:N
    max_seq_len: int = 512  # classifier tokens per chunk, CLS/SEP included
    force_tokens: list[str] = field(default_factory=list)  # words containing one of these are always kept

    def validate(self) -> None:
        super().validate()
        if not isinstance(self.model_path, str) or not self.model_path.strip():
            raise TokenbenchError(f"method '{self.label}': model_path must be a checkpoint directory or hub id")
        _check_device(self.label, self.compressor_device)
        self.check_int("max_seq_len", 8)
        self.force_tokens = [str(t) for t in (self.force_tokens or [])]

    def prepare(self, target: Any) -> None:
        super().prepare(target)
        if self.is_noop():
            return
        device = resolve_compressor_device(self.compressor_device, self._target)
        self._lm, self.compressor_load_s = shared_model(
            (f"llmlingua2:{self.model_path}", device), lambda: load_classifier(self.model_path, device))

    @property
    def classifier(self) -> Any:
        return self.prepared("_lm")

    def chunks(self, pieces: list[str]) -> list[tuple[int, int]]:
        """Word ranges ``[a, b)`` of at most ``max_seq_len - 2`` classifier tokens, ending at a sentence end
        when one is in reach."""
        tok = self.classifier.tokenizer
        room = self.max_seq_len - 2
        sizes = [len(x) for x in tok(pieces, add_special_tokens=False)["input_ids"]] if pieces else []
        out, a = [], 0
        while a < len(pieces):
            b, used, last_end = a, 0, None
            while b < len(pieces) and (used + sizes[b] <= room or b == a):
                used += sizes[b]
                b += 1
                if pieces[b - 1].rstrip().endswith(_SENTENCE_END) or "\n" in pieces[b - 1][1:]:
                    last_end = b
            if b < len(pieces) and last_end is not None and last_end > a:
                b = last_end
            out.append((a, b))
            a = b
        return out

    def word_probs(self, pieces: list[str]) -> list[float]:
        import torch

        clf = self.classifier
        probs = [0.0] * len(pieces)
        for a, b in self.chunks(pieces):
            text = "".join(pieces[a:b])
            enc = clf.tokenizer(text, return_offsets_mapping=True, return_special_tokens_mask=True,
                                truncation=True, max_length=self.max_seq_len, return_tensors="pt")
            offsets = enc.pop("offset_mapping")[0].tolist()
            special = enc.pop("special_tokens_mask")[0].tolist()
            with torch.inference_mode():
                logits = clf.model(**{k: v.to(clf.device) for k, v in enc.items()}).logits[0].float()
            keep = logits.softmax(-1)[:, 1].cpu().tolist()
            sums, counts = [0.0] * (b - a), [0] * (b - a)
            toks = [(s, p) for (s, e), sp, p in zip(offsets, special, keep) if not sp and e > s]
            for w, (_, p) in zip(assign([s for s, _ in toks], char_starts(pieces[a:b])), toks):
                sums[w] += p
                counts[w] += 1
            for i in range(b - a):
                probs[a + i] = sums[i] / counts[i] if counts[i] else 0.0
        return probs

    def select(self, body: str, question: str, budget: int) -> Fit:
        pieces = words(body)
        probs = self.word_probs(pieces)
        if self.force_tokens:
            probs = [1.0 + p if any(t in w for t in self.force_tokens) else p for w, p in zip(pieces, probs)]
        return self.fit(pieces, probs, budget)

