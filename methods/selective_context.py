"""Selective Context: drop the lexical units that carry the least self-information under a small causal LM.

Li, Dong, Guerin, Lin. "Compressing Context to Enhance Inference Efficiency of Large Language Models",
EMNLP 2023 (arXiv:2310.06201). Reference code: https://github.com/liyucheng09/Selective_Context
(``src/selective_context/__init__.py``, class ``SelectiveContext``: ``get_self_information``,
``_lexical_unit``, ``_calculate_lexical_unit``, ``self_info_mask``). Written independently.

Rule, as the reference computes it:

1. the context is cut into sentences; each sentence is scored **on its own** by the compressor LM after a
   start token (``<|endoftext|>`` for GPT-2 in the reference; here the compressor's BOS, else EOS): the
   self-information of a token is ``I(x_t) = -log p(x_t | x_<t)`` (nats);
2. a lexical unit's self-information is the **mean** over its tokens (``np.mean`` in the reference, for
   sentences and for phrases alike); a token unit's is its own;
3. the units with the lowest self-information are dropped: the reference drops those under the
   ``reduce_ratio`` percentile of the units' values; here the budget is in target tokens, so units are kept
   from the most informative down while they fit (``fit``), which is the same cut measured in tokens instead
   of in units.

``unit``: ``sentence``; ``word`` (a whitespace-separated word with the whitespace before it); ``token`` (a
compressor token). The reference's default level, ``phrase``, iterates over spaCy's tokens (``for chunk in
doc`` — the noun-chunk variant is commented out), i.e. words and punctuation; ``word`` is that without
spaCy (punctuation stays attached to its word). Default ``word``.

Deviations: no spaCy (see above); whitespace is kept as in the text (the reference collapses every run of
whitespace to one space and strips sentences); dropped units leave nothing behind (the reference can put a
mask token or a sentence's leading words in place of a dropped sentence: its defaults leave nothing for
phrases and tokens); a token that straddles two units counts for the unit where it starts (the reference
splits its value between them); ``condition="context"`` is an option the reference does not have (every
token conditioned on the whole preceding context instead of its sentence). Budget unit: one lexical unit.
"""

from __future__ import annotations

from dataclasses import dataclass

from tokenbench.errors import TokenbenchError
from tokenbench.families.prompt import (
    Fit,
    LMCompressor,
    assign,
    char_starts,
    sentences,
    token_nll,
    token_pieces,
    words,
)
from tokenbench.registry import register_method

UNITS = ("sentence", "word", "token")
CONDITIONS = ("sentence", "context")


@register_method("selective_context", family="prompt")
@dataclass
class SelectiveContext(LMCompressor):
    """Self-information of lexical units under the compressor; the least informative are dropped."""

    unit: str = "word"  # sentence | word | token (compressor token): what is kept or dropped
    condition: str = "sentence"  # sentence (reference: each sentence scored alone) | context (whole prefix)
    batch_size: int = 16  # sentences scored per forward (right-padded)

    def validate(self) -> None:
        super().validate()
        if self.unit not in UNITS:
            raise TokenbenchError(f"method '{self.label}': unit must be one of {', '.join(UNITS)}, "
                                  f"got {self.unit!r}")
        if self.condition not in CONDITIONS:
            raise TokenbenchError(f"method '{self.label}': condition must be one of {', '.join(CONDITIONS)}, "
                                  f"got {self.condition!r}")
        self.check_int("batch_size", 1)

    def self_information(self, body: str) -> tuple[list[int], list[float]]:
        """Start character and self-information of every compressor token of ``body``."""
        if self.condition == "context":
            ids, starts = self.encode(body)
            return starts, self.token_losses(ids)
        sents = sentences(body)
        offsets = char_starts(sents)
        encoded = [self.encode(s) for s in sents]
        losses = self.batch_losses([ids for ids, _ in encoded])
        starts, info = [], []
        for off, (_, st), loss in zip(offsets, encoded, losses):
            starts.extend(off + s for s in st)
            info.extend(loss)
        return starts, info

    def batch_losses(self, seqs: list[list[int]]) -> list[list[float]]:
        """``token_losses`` of several independent sequences, right-padded into batches."""
        import torch

        model, device, bos = self.lm.model, self.lm.device, self.start_id()
        out: list[list[float]] = [[] for _ in seqs]
        order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))  # similar lengths share a batch
        with torch.inference_mode():
            for b in range(0, len(order), self.batch_size):
                idx = [i for i in order[b:b + self.batch_size] if seqs[i]]
                if not idx:
                    continue
                n = max(len(seqs[i]) for i in idx) + 1
                x = torch.full((len(idx), n), bos, dtype=torch.long)
                mask = torch.zeros((len(idx), n), dtype=torch.long)
                for r, i in enumerate(idx):
                    x[r, : len(seqs[i]) + 1] = torch.tensor([bos, *seqs[i]])
                    mask[r, : len(seqs[i]) + 1] = 1
                logits = model(input_ids=x.to(device), attention_mask=mask.to(device)).logits.float()
                nll = token_nll(logits[:, :-1], x[:, 1:].to(device)).cpu()
                for r, i in enumerate(idx):
                    out[i] = nll[r, : len(seqs[i])].tolist()
        return out

    def select(self, body: str, question: str, budget: int) -> Fit:
        starts, info = self.self_information(body)
        if self.unit == "token":
            pieces, owner = token_pieces(body, starts)
        else:
            pieces = sentences(body) if self.unit == "sentence" else words(body)
            owner = assign(starts, char_starts(pieces))
        sums, counts = [0.0] * len(pieces), [0] * len(pieces)
        for o, v in zip(owner, info):
            sums[o] += v
            counts[o] += 1
        scores = [s / c if c else 0.0 for s, c in zip(sums, counts)]  # mean self-information per unit
        return self.fit(pieces, scores, budget)
