"""The ``vlm`` family: visual-token pruning in LLaVA-style vision-language models.

A method file holds only its idea. There are two kinds (``VLMMethod.stage``):

- ``"vision"``: the method sees the vision encoder's features of the visual tokens at the layer LLaVA takes
  them from (``vision_feature_layer``, before the projector) and returns the ``n_keep`` feature vectors that
  go on to the projector and the language model (``reduce(ctx)``; a selection, or selected plus merged
  tokens). ``VisionContext`` gives it the [CLS] token's attention to the visual tokens at that layer and the
  layer's keys averaged over heads, computed from the layer's own projections (only the [CLS] row of the
  attention, no ``N x N`` map, and the tower's attention stays fused).
- ``"llm"``: every visual token enters the language model; after decoder layer ``prune_layer - 1`` the
  method picks the ``n_keep`` visual tokens the remaining layers keep (``select(ctx)``, indices into the
  visual tokens). ``LLMContext`` gives it the hidden states entering layer ``prune_layer``, the previous
  layer's cached keys, and that layer's attention of the last prompt token to every token (computed from its
  own query projection and the cache; the model's attention stays SDPA).

This base does the rest (``VLMSession.prefill``): runs the vision tower, calls the method, projects, splices
the kept visual embeddings into the prompt embeddings in place of the ``<image>`` placeholders, prefills the
language model with explicit positions, and for ``"llm"`` methods cuts the hidden states, positions, rotary
embeddings and mask at layer ``prune_layer`` (layers before it cache every token, layers from it only the
kept ones, as FastV's reference does); decoding then continues at the true next position. The budget is
``keep_ratio`` of the visual tokens or ``n_keep`` visual tokens, validated before any model loads; the
achieved count is recorded per sample from the tensors' shapes (``VLMSession.stats``).

Supported models: ``LlavaForConditionalGeneration`` (LLaVA-1.5 and any LLaVA with a single feature layer and
one image per prompt): every method. ``LlavaNextForConditionalGeneration`` (LLaVA-NeXT / 1.6: any-resolution
tiles, unpadded, with a newline token per row): the in-LM methods (``fastv``, ``dart``) and ``none``; the
image's visual tokens are then every packed tile token, newline tokens included, as the model's own
``get_image_features`` builds them. Methods that need the [CLS] token (``requires_cls``) need a CLIP-style
tower with one and the ``default`` feature strategy. Other classes (Qwen2-VL's M-RoPE and merged patches,
...) fail with one line naming what is supported.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from tokenbench.errors import IncompatibleError, TokenbenchError
from tokenbench.method import Method

SUPPORTED = ("LlavaForConditionalGeneration (every method) and LlavaNextForConditionalGeneration (in-LM methods: "
             "fastv, dart; and none), one image per prompt, one vision feature layer")
NEXT = "LlavaNextForConditionalGeneration"


# --- what a method sees ------------------------------------------------------------------------------


@dataclass
class VisionContext:
    """One image batch at the vision feature layer. ``B`` images, ``N`` visual tokens, ``C`` vision width."""

    features: torch.Tensor  # (B, N, C) the visual tokens' features, as the projector would receive them
    n_keep: int  # visual tokens the method must return
    cls_features: torch.Tensor | None = None  # (B, C) the [CLS] token at the feature layer (None: no CLS)
    attn_input: torch.Tensor | None = field(default=None, repr=False)  # (B, T, C) the layer's attention input
    attn_module: Any = field(default=None, repr=False)  # the feature layer's attention (q_proj, k_proj, heads)
    first_visual: int = 1  # index of the first visual token among the T tokens of ``attn_input``
    pixels: torch.Tensor | None = field(default=None, repr=False)  # (B, ...) the preprocessed image(s)
    _keys: torch.Tensor | None = field(default=None, repr=False)

    @property
    def n_tokens(self) -> int:
        return int(self.features.shape[1])

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        m = self.attn_module
        b, t, _ = x.shape
        return x.view(b, t, m.num_heads, m.head_dim).transpose(1, 2)  # (B, H, T, d)

    def _require(self) -> None:
        if self.attn_input is None or self.attn_module is None:
            raise TokenbenchError("this method needs the vision feature layer's attention, which was not captured")

    def cls_attention(self) -> torch.Tensor:
        """The [CLS] query's softmax attention (over all tokens, [CLS] included) to each visual token, averaged
        over heads: ``(B, N)`` float32 — the attention map row LLaVA's feature layer computes for [CLS]."""
        self._require()
        m = self.attn_module
        q = self._heads(m.q_proj(self.attn_input[:, :1]))  # (B, H, 1, d)
        k = self.keys_per_head()
        logits = (q.float() @ k.float().transpose(-1, -2)) * m.scale
        probs = logits.softmax(dim=-1).mean(dim=1)[:, 0]  # (B, T)
        return probs[:, self.first_visual:self.first_visual + self.n_tokens]

    def keys_per_head(self) -> torch.Tensor:
        """The feature layer's keys ``(B, H, T, d)`` for every token ([CLS] first)."""
        self._require()
        if self._keys is None:
            self._keys = self._heads(self.attn_module.k_proj(self.attn_input))
        return self._keys

    def keys(self) -> torch.Tensor:
        """The visual tokens' keys at the feature layer averaged over heads, ``(B, N, d)`` (VisionZip's metric)."""
        k = self.keys_per_head().mean(dim=1)
        return k[:, self.first_visual:self.first_visual + self.n_tokens]

    def image_keys(self) -> list[int]:
        """One integer per image, from its preprocessed pixels (exact on any device): a per-image seed."""
        if self.pixels is None:
            return [0] * int(self.features.shape[0])
        q = (self.pixels.float().flatten(1) * 1000).round().to(torch.int64)
        return [int(v) for v in (q * torch.arange(1, q.shape[1] + 1, device=q.device) % 1_000_003).sum(dim=1)]

    def gather(self, idx: torch.Tensor) -> torch.Tensor:
        """The features of visual tokens ``idx`` ``(B, K)``, kept in their original (spatial) order."""
        idx = idx.sort(dim=-1).values
        return self.features.gather(1, idx.unsqueeze(-1).expand(-1, -1, self.features.shape[-1]))


@dataclass
class LLMContext:
    """The language model's state entering decoder layer ``layer`` (B = 1 row per image prompt)."""

    layer: int  # the first layer that sees only the kept visual tokens (the method's ``prune_layer``)
    hidden: torch.Tensor  # (B, L, D) hidden states entering ``layer`` (output of layer ``layer - 1``)
    visual_start: int  # index of the first visual token in the sequence
    n_visual: int  # visual tokens in the sequence
    n_keep: int  # visual tokens the method must keep
    norm: Any = field(default=None, repr=False)  # the language model's final norm
    prev_keys: torch.Tensor | None = field(default=None, repr=False)  # (B, Hkv, L, d) layer-1 keys, post-RoPE
    _last_attention: Any = field(default=None, repr=False)  # callable -> (B, L) float32

    @property
    def visual(self) -> slice:
        return slice(self.visual_start, self.visual_start + self.n_visual)

    def last_attention(self) -> torch.Tensor:
        """Layer ``layer - 1``'s attention of the last prompt token to every token, averaged over heads,
        ``(B, L)`` float32 (FastV's score, before taking the visual slice)."""
        if self._last_attention is None:
            raise TokenbenchError("the previous layer's attention was not captured")
        return self._last_attention()


# --- the method base -------------------------------------------------------------------------------


@dataclass
class VLMMethod(Method):
    """Base of every visual-token method. Budget: ``n_keep`` visual tokens when set, else ``keep_ratio`` of
    them (``floor``, at least 1)."""

    family: ClassVar[str] = "vlm"
    takes_budget: ClassVar[bool] = True
    stage: ClassVar[str] = "vision"  # "vision" (before the projector) or "llm" (inside the LM)
    requires_cls: ClassVar[bool] = False  # needs the vision tower's [CLS] token (its attention)
    needs_vision_attention: ClassVar[bool] = False  # VisionContext.cls_attention()/keys() are used

    keep_ratio: float = 1.0  # fraction of the visual tokens kept, in (0, 1]
    n_keep: int | None = None  # visual tokens kept (overrides keep_ratio when set)

    def validate(self) -> None:
        kr = self.keep_ratio
        if isinstance(kr, bool) or not isinstance(kr, (int, float)) or not 0.0 < float(kr) <= 1.0:
            raise TokenbenchError(f"method '{self.label}': keep_ratio must be in (0, 1], got {kr!r}")
        self.check_int("n_keep", 1, optional=True)

    def budget(self, n_visual: int) -> int:
        """Visual tokens kept out of ``n_visual``; a budget above the count fails with one line."""
        if self.n_keep is not None:
            if self.n_keep > n_visual:
                raise TokenbenchError(f"method '{self.label}': n_keep={self.n_keep} exceeds the {n_visual} "
                                      "visual tokens of this model (use n_keep <= that, or keep_ratio)")
            return int(self.n_keep)
        return max(1, min(n_visual, math.floor(float(self.keep_ratio) * n_visual + 1e-9)))

    def min_budget(self) -> int:
        """The smallest budget the method can produce (e.g. VisionZip needs room for [CLS] + a context token)."""
        return 1

    def nominal_budget(self) -> dict[str, Any]:
        return {"keep_ratio": self.keep_ratio, "n_keep": self.n_keep}

    def is_noop(self) -> bool:
        return self.n_keep is None and float(self.keep_ratio) >= 1.0

    def check_model(self, model: Any) -> None:
        """Raise ``IncompatibleError`` when the method cannot apply to ``model`` (already a supported class)."""
        if self.requires_cls:
            cfg = model.config
            if cfg.vision_config.model_type not in ("clip_vision_model", "clip"):
                raise IncompatibleError(
                    f"method '{self.label}' needs a [CLS] token in the vision tower (CLIP); this model's tower "
                    f"is '{cfg.vision_config.model_type}', which has none")
            if cfg.vision_feature_select_strategy != "default":
                raise IncompatibleError(f"method '{self.label}' needs vision_feature_select_strategy='default'")

    # --- the method's idea ---------------------------------------------------------------------------

    def reduce(self, ctx: VisionContext) -> torch.Tensor:
        """stage "vision": the ``(B, ctx.n_keep, C)`` features passed on to the projector."""
        raise NotImplementedError

    def select(self, ctx: LLMContext) -> torch.Tensor:
        """stage "llm": indices ``(B, ctx.n_keep)`` of the visual tokens (0 .. n_visual - 1) kept after
        ``prune_layer``."""
        raise NotImplementedError


@dataclass
class LLMStageMethod(VLMMethod):
    """Base of the in-LM methods: every visual token enters the language model and ``select`` keeps
    ``n_keep`` of them after decoder layer ``prune_layer - 1``."""

    stage: ClassVar[str] = "llm"

    prune_layer: int = 2  # K: layers from K on see only the kept visual tokens (FastV's and DART's K = 2)

    def validate(self) -> None:
        super().validate()
        self.check_int("prune_layer", 1)


# --- applying it -----------------------------------------------------------------------------------


def check_model(model: Any, method: VLMMethod) -> None:
    """The model must be a supported class and fit the method; one line otherwise."""
    name = type(model).__name__
    if name not in ("LlavaForConditionalGeneration", NEXT):
        raise IncompatibleError(f"the vlm family supports {SUPPORTED}; got {name}")
    if name == NEXT and method.stage == "vision" and method.takes_budget:
        raise IncompatibleError(
            f"method '{method.label}' reduces the vision features of one LLaVA-1.5 image; on LLaVA-NeXT's "
            "any-resolution tiles the vlm family runs the in-LM methods (fastv, dart) and none")
    cfg = model.config
    if not isinstance(cfg.vision_feature_layer, int):
        raise IncompatibleError("the vlm family needs a single vision_feature_layer (an int); got a list")
    if method.stage == "llm":
        n_layers = cfg.text_config.num_hidden_layers
        k = method.prune_layer
        if not 1 <= k < n_layers:
            raise TokenbenchError(f"method '{method.label}': prune_layer must be in [1, {n_layers - 1}] for "
                                  f"this {n_layers}-layer language model, got {k}")
    method.check_model(model)


def _rope_module(attn: Any) -> Any:
    return sys.modules[type(attn).__module__]


@dataclass
class PrefillResult:
    logits: torch.Tensor  # (B, vocab) last position
    next_position: int  # position of the first generated token
    stats: dict[str, Any]


class VLMSession:
    """Runs prompts through a LLaVA model with a method applied (one image per prompt, batch of 1)."""

    def __init__(self, method: VLMMethod, model: Any):
        check_model(model, method)
        self.method, self.model = method, model
        cfg = model.config
        self.lm = model.model.language_model
        self.tower = model.model.vision_tower
        self.projector = model.model.multi_modal_projector
        self.image_token_id = int(cfg.image_token_id)
        self.feature_layer = int(cfg.vision_feature_layer)
        self.strategy = cfg.vision_feature_select_strategy
        self.layers = self.lm.layers
        self.tiled = type(model).__name__ == NEXT
        self.layer_tokens: list[int] = []  # tokens entering each decoder layer in the last prefill

    # --- vision ------------------------------------------------------------------------------------

    def _vision_layer(self) -> Any:
        encoder = getattr(getattr(self.tower, "vision_model", self.tower), "encoder", None)
        if encoder is None or not hasattr(encoder, "layers"):
            raise IncompatibleError(f"cannot find the encoder layers of vision tower {type(self.tower).__name__}")
        return encoder.layers[self.feature_layer]

    def visual_features(self, pixel_values: torch.Tensor, n_keep: int | None,
                        image_sizes: torch.Tensor | None = None) -> tuple[torch.Tensor, int]:
        """Projected visual embeddings after the vision-stage method ``(B, K, D)`` and the count before it."""
        method = self.method
        if self.tiled:  # LLaVA-NeXT: the model's own tiling, projection, unpadding and newline tokens
            if image_sizes is None:
                raise TokenbenchError("LLaVA-NeXT needs the processor's image_sizes")
            cfg = self.model.config
            out = self.model.model.get_image_features(
                pixel_values.to(self.projector.linear_1.weight.dtype), image_sizes,
                vision_feature_layer=cfg.vision_feature_layer,
                vision_feature_select_strategy=cfg.vision_feature_select_strategy, return_dict=True)
            feats = torch.cat(list(out.pooler_output), dim=0).unsqueeze(0)
            return feats, int(feats.shape[1])
        captured: dict[str, torch.Tensor] = {}
        handle = None
        if method.stage == "vision" and method.needs_vision_attention and n_keep is not None:
            attn = self._vision_layer().self_attn

            def grab(module, args, kwargs):
                captured["x"] = kwargs.get("hidden_states", args[0] if args else None)

            handle = attn.register_forward_pre_hook(grab, with_kwargs=True)
        try:
            out = self.tower(pixel_values.to(self.projector.linear_1.weight.dtype), output_hidden_states=True)
        finally:
            if handle is not None:
                handle.remove()
        states = out.hidden_states[self.feature_layer]
        if self.strategy == "default":
            feats, cls, first = states[:, 1:], states[:, 0], 1
        else:
            feats, cls, first = states, None, 0
        n_visual = int(feats.shape[1])
        if n_keep is not None and method.stage == "vision":
            ctx = VisionContext(features=feats, n_keep=n_keep, cls_features=cls, attn_input=captured.get("x"),
                                attn_module=self._vision_layer().self_attn if captured else None,
                                first_visual=first, pixels=pixel_values)
            feats = method.reduce(ctx)
            if tuple(feats.shape[:2]) != (states.shape[0], n_keep):
                raise AssertionError(f"method '{method.label}' returned {tuple(feats.shape)} for a budget of {n_keep}")
        return self.projector(feats), n_visual

    # --- the language model --------------------------------------------------------------------------

    def image_span(self, input_ids: torch.Tensor) -> tuple[int, int]:
        where = (input_ids[0] == self.image_token_id).nonzero().flatten()
        if where.numel() == 0:
            raise TokenbenchError("the prompt has no <image> placeholder")
        start, n = int(where[0]), int(where.numel())
        if int(where[-1]) - start + 1 != n:
            raise TokenbenchError("the vlm family supports one image per prompt (one contiguous <image> span)")
        return start, n

    @contextmanager
    def _counting(self) -> Iterator[None]:
        """Record the tokens entering every decoder layer (from the tensors, not from the method)."""
        self.layer_tokens = []

        def count(module, args, kwargs):
            h = kwargs.get("hidden_states", args[0] if args else None)
            self.layer_tokens.append(int(h.shape[1]))

        handles = [layer.register_forward_pre_hook(count, with_kwargs=True) for layer in self.layers]
        try:
            yield
        finally:
            for h in handles:
                h.remove()

    def prefill(self, input_ids: torch.Tensor, pixel_values: torch.Tensor, cache: Any,
                cache_kw: str = "cache", image_sizes: torch.Tensor | None = None) -> PrefillResult:
        """Vision tower + method + projector + language-model prefill; returns the last logits."""
        if input_ids.shape[0] != 1:
            raise TokenbenchError("the vlm runner takes one prompt at a time")
        method = self.method
        start, n_visual = self.image_span(input_ids)
        n_keep = None if method.is_noop() else method.budget(n_visual)
        if n_keep is not None and n_keep < method.min_budget():
            raise TokenbenchError(f"method '{method.label}': a budget of {n_keep} visual tokens is below its "
                                  f"minimum of {method.min_budget()}")
        if n_keep == n_visual:
            n_keep = None  # keep-all: nothing to reduce
        image, n_in = self.visual_features(pixel_values, n_keep, image_sizes)
        if n_in != n_visual:
            raise TokenbenchError(f"the prompt has {n_visual} <image> placeholders but the tower gave {n_in} tokens")
        text = self.lm.get_input_embeddings()(input_ids)
        embeds = torch.cat([text[:, :start], image.to(text.dtype), text[:, start + n_visual:]], dim=1)
        length = int(embeds.shape[1])
        positions = torch.arange(length, device=embeds.device).unsqueeze(0)
        handles: list[Any] = []
        if method.stage == "llm" and n_keep is not None:
            handles = self._install_prune(start, n_visual, n_keep, cache)
        try:
            with self._counting():
                out = self.lm(inputs_embeds=embeds, position_ids=positions, use_cache=True, **{cache_kw: cache})
        finally:
            for h in handles:
                h.remove()
        # counted from the tensors: the last layer's tokens minus the text tokens around the image
        kept = self.layer_tokens[-1] - (length - int(image.shape[1]))
        hidden = out.last_hidden_state[:, -1:]
        logits = self.model.lm_head(hidden)[:, -1]
        stats = {
            "visual_tokens_in": n_visual,
            "visual_tokens_kept": kept,
            "achieved_keep_ratio": kept / n_visual,
            "prune_layer": method.prune_layer if method.stage == "llm" else 0,
            "lm_input_tokens": length,
            "lm_tokens_per_layer": list(self.layer_tokens),
        }
        return PrefillResult(logits, length, stats)

    def _install_prune(self, start: int, n_visual: int, n_keep: int, cache: Any) -> list[Any]:
        """Hooks that cut the sequence at layer ``prune_layer`` (and feed the cut tensors to later layers)."""
        k = int(self.method.prune_layer)
        prev = self.layers[k - 1]
        grabbed: dict[str, Any] = {}
        pruned: dict[str, Any] = {}  # after the cut: the cut positions, rotary embeddings and mask of later layers

        def grab(module, args, kwargs):  # layer k-1's attention input (after its input norm), last row only
            h = kwargs.get("hidden_states", args[0] if args else None)
            cos, sin = kwargs["position_embeddings"]
            grabbed.update(h=h[:, -1:], cos=cos[:, -1:], sin=sin[:, -1:])

        def last_attention() -> torch.Tensor:
            attn = prev.self_attn
            q = attn.q_proj(grabbed["h"])
            b = q.shape[0]
            q = q.view(b, 1, -1, attn.head_dim).transpose(1, 2)  # (B, Hq, 1, d)
            keys = _layer_keys(cache, k - 1)  # (B, Hkv, L, d) post-RoPE
            rope = _rope_module(attn)
            q, _ = rope.apply_rotary_pos_emb(q, q, grabbed["cos"], grabbed["sin"])
            g = q.shape[1] // keys.shape[1]
            keys = keys.repeat_interleave(g, dim=1)
            logits = (q.float() @ keys.float().transpose(-1, -2)) * attn.scaling
            return logits.softmax(dim=-1).mean(dim=1)[:, 0]  # (B, L)

        def cut(module, args, kwargs):
            h = kwargs.get("hidden_states", args[0] if args else None)
            ctx = LLMContext(layer=k, hidden=h, visual_start=start, n_visual=n_visual, n_keep=n_keep,
                             norm=self.lm.norm, prev_keys=_layer_keys(cache, k - 1), _last_attention=last_attention)
            sel = self.method.select(ctx)
            if tuple(sel.shape) != (h.shape[0], n_keep):
                raise AssertionError(f"method '{self.method.label}' selected {tuple(sel.shape)}, budget {n_keep}")
            keep = torch.cat([torch.arange(start, device=h.device),
                              start + sel[0].sort().values.to(h.device),
                              torch.arange(start + n_visual, h.shape[1], device=h.device)])
            cos, sin = kwargs["position_embeddings"]
            mask = kwargs.get("attention_mask")
            if isinstance(mask, torch.Tensor) and mask.dim() == 4:
                mask = mask[:, :, keep][:, :, :, keep]
            pruned.update(position_embeddings=(cos[:, keep], sin[:, keep]), attention_mask=mask,
                          position_ids=kwargs["position_ids"][:, keep])
            return _feed(args, kwargs, h[:, keep], pruned)

        def later(module, args, kwargs):
            if not pruned:
                return None
            h = kwargs.get("hidden_states", args[0] if args else None)
            return _feed(args, kwargs, h, pruned)

        handles = [prev.self_attn.register_forward_pre_hook(grab, with_kwargs=True),
                   self.layers[k].register_forward_pre_hook(cut, with_kwargs=True)]
        handles += [layer.register_forward_pre_hook(later, with_kwargs=True) for layer in self.layers[k + 1:]]
        return handles

    @contextmanager
    def decoding(self) -> Iterator[None]:
        """Decode steps after an llm-stage prune: layers from ``prune_layer`` hold fewer cached tokens than
        layer 0, so a single query there attends to its whole (shorter) cache without a mask."""
        if self.method.stage != "llm" or self.method.is_noop():
            yield
            return
        k = int(self.method.prune_layer)

        def no_mask(module, args, kwargs):
            if kwargs.get("attention_mask") is None:
                return None
            return args, {**kwargs, "attention_mask": None}

        handles = [layer.register_forward_pre_hook(no_mask, with_kwargs=True) for layer in self.layers[k:]]
        try:
            yield
        finally:
            for h in handles:
                h.remove()


def _feed(args: tuple, kwargs: dict, hidden: torch.Tensor, pruned: dict[str, Any]) -> tuple[tuple, dict]:
    """A decoder layer's call arguments with the cut ``hidden`` states and the cut ``pruned`` tensors."""
    kwargs = {**kwargs, **pruned}
    if "hidden_states" in kwargs or not args:
        kwargs["hidden_states"] = hidden
        return args, kwargs
    return (hidden, *args[1:]), kwargs


def _layer_keys(cache: Any, idx: int) -> torch.Tensor:
    layers = getattr(cache, "layers", None)
    keys = getattr(layers[idx], "keys", None) if layers is not None else cache.key_cache[idx]  # transformers < 4.56
    if keys is None:
        raise TokenbenchError("the cache holds no keys for the layer before the prune layer")
    return keys

