"""KV-cache family: every registered kv method is checked automatically (no-op at keep-all, budget per row and
layer with left padding, real cache shrinkage, batch == single runs, decode capacity), plus the eviction cache
and attention function against plain transformers, and method-specific behaviour of the built-in methods."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import ClassVar

import pytest
import torch
import torch.nn.functional as F
from tokenbench.config import MeasureSettings
from tokenbench.errors import TokenbenchError
from tokenbench.families.kv import KVMethod, ScoreContext
from tokenbench.kv_cache import EvictionCache, aligned
from tokenbench.lm import LMRunner, Prompt
from tokenbench.models.tiny import TinyLlama
from tokenbench.registry import METHODS, load_all
from tokenbench.task import Sample

load_all()

KV_METHODS = METHODS.family("kv")
IDS = [c.registered_name for c in KV_METHODS]
NoneKV = METHODS.get("none", "kv").cls
P, S = 40, 6  # prefix (compressible) and suffix lengths of the synthetic prompts


def init_fields(cls: type) -> set[str]:
    return {f.name for f in dataclasses.fields(cls) if f.init}


def configurable(cls: type) -> bool:
    return cls.takes_budget and {"keep_ratio", "n_keep"} <= init_fields(cls)


CONFIGURABLE = [c for c in KV_METHODS if configurable(c)]
CIDS = [c.registered_name for c in CONFIGURABLE]
PREFILLERS = [c for c in CONFIGURABLE if "prefill" in c.supported_phases]
DECODERS = [c for c in CONFIGURABLE if "decode" in c.supported_phases]
DECODE_TIME = [c.registered_name for c in DECODERS]


def make(cls: type, **kw) -> KVMethod:
    return cls(**{k: v for k, v in kw.items() if k in init_fields(cls)})


@pytest.fixture(scope="module")
def loaded():
    return TinyLlama(num_hidden_layers=2, attn_implementation="eager").load()


@pytest.fixture(scope="module")
def loaded_sdpa():
    return TinyLlama(num_hidden_layers=2, attn_implementation="sdpa").load()


def prompt(seed: int = 0, batch: int = 1, n_prefix: int = P, n_suffix: int = S) -> Prompt:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 390, (batch, n_prefix + n_suffix), generator=g)
    return Prompt(ids[:, :n_prefix], ids[:, n_prefix:])


def ragged(seed: int, lengths: list[int], n_suffix: list[int] | None = None) -> list[Prompt]:
    """Single-row prompts of different prefix (and suffix) lengths."""
    g = torch.Generator().manual_seed(seed)
    n_suffix = n_suffix or [S] * len(lengths)
    return [Prompt(torch.randint(3, 390, (1, n), generator=g), torch.randint(3, 390, (1, s), generator=g))
            for n, s in zip(lengths, n_suffix)]


def gen(loaded, method, p: Prompt, n: int = 6, logits: bool = True):
    return LMRunner(loaded, method, MeasureSettings(warmup=0)).generate(p, n, n, return_logits=logits)


def assert_same_generation(a, b, tol: float = 1e-4) -> None:
    """Same tokens, logits equal within ``tol`` at every step (both generated with return_logits)."""
    assert torch.equal(a.tokens, b.tokens)
    for x, y in zip(a.logits, b.logits):
        torch.testing.assert_close(x, y, atol=tol, rtol=tol)


def per_token_bytes(loaded, batch: int = 1) -> int:
    """Bytes one cached token costs in one layer (keys + values, all KV heads, float32)."""
    cfg = loaded.model.config
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    return 2 * batch * cfg.num_key_value_heads * head_dim * 4


def prefill(loaded, method: KVMethod, p: Prompt) -> EvictionCache:
    """The compressed prefill alone, through a session (context, plus the question when query-aware)."""
    model = loaded.model
    pm, sm = p.masks()
    ids, valid, seg = p.prefix_ids, pm, pm
    if method.query_aware:
        ids, valid = torch.cat([p.prefix_ids, p.suffix_ids], 1), torch.cat([pm, sm], 1)
        seg = torch.cat([pm, torch.zeros_like(sm)], 1)
    pos = (valid.cumsum(1) - 1).clamp(min=0)
    cache = EvictionCache(model.config.num_hidden_layers)
    with torch.inference_mode(), method.attach(model, cache) as session:
        cache.set_inputs(pos, valid)
        with session.compressing(seg):
            model(input_ids=ids, position_ids=pos, cache=cache, use_cache=True)
    return cache


def live_positions(layer) -> list[list[list[int]]]:
    """[row][head] -> sorted true positions of the live slots."""
    out = []
    for b in range(layer.valid.shape[0]):
        out.append([sorted(layer.pos[b, h][layer.valid[b, h]].tolist()) for h in range(layer.valid.shape[1])])
    return out


# --- the eviction cache and attention function against plain transformers -------------------------------


def hf_greedy(model, ids: torch.Tensor, n: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
    from transformers import DynamicCache

    with torch.inference_mode():
        cache = DynamicCache(config=model.config)
        logits = model(input_ids=ids, cache=cache, use_cache=True).logits[:, -1]
        toks, seen = [], []
        for _ in range(n):
            seen.append(logits.float())
            t = logits.argmax(-1)
            toks.append(t)
            logits = model(input_ids=t[:, None], cache=cache, use_cache=True).logits[:, -1]
    return torch.stack(toks, 1), seen


@pytest.mark.parametrize("query_aware", [False, True])
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_full_cache_equals_plain_transformers(loaded, loaded_sdpa, attn, query_aware) -> None:
    """`none` through the eviction cache + tokenbench attention == transformers' own cache and attention,
    also for rows of a left-padded batch (each compared with its prompt alone)."""
    lm = loaded if attn == "eager" else loaded_sdpa
    prompts = ragged(11, [40, 23, 31], [6, 4, 6])
    out = gen(lm, NoneKV(query_aware=query_aware), Prompt.batch(prompts), n=5)
    for row, p in enumerate(prompts):
        ref_tok, ref_logits = hf_greedy(lm.model, torch.cat([p.prefix_ids, p.suffix_ids], 1), 5)
        assert torch.equal(out.tokens[row], ref_tok[0])
        for a, b in zip(out.logits, ref_logits):
            torch.testing.assert_close(a[row], b[0], atol=1e-4, rtol=1e-4)


def test_cache_is_stored_at_kv_head_granularity(loaded) -> None:
    cfg = loaded.model.config
    assert cfg.num_key_value_heads < cfg.num_attention_heads  # the tiny model is GQA
    cache = prefill(loaded, make(METHODS.get("streaming_llm", "kv").cls, keep_ratio=0.5), prompt(12))
    for layer in cache.layers:
        assert layer.keys.shape[1] == cfg.num_key_value_heads  # never expanded to query heads
        assert layer.valid.shape[:2] == layer.keys.shape[:2]


def test_loglikelihood_matches_transformers(loaded) -> None:
    runner = LMRunner(loaded, NoneKV(), MeasureSettings(warmup=0))
    ctx, cont = list(range(5, 30)), [40, 41, 42, 43]
    ll, greedy = runner.loglikelihood(ctx, cont)
    with torch.inference_mode():
        logits = loaded.model(input_ids=torch.tensor([ctx + cont])).logits[0].float()
    logp = logits.log_softmax(-1)[len(ctx) - 1:-1]
    ref = logp.gather(1, torch.tensor(cont)[:, None]).sum()
    assert ll == pytest.approx(float(ref), abs=1e-4)
    assert greedy == bool((logp.argmax(-1) == torch.tensor(cont)).all())
    compressed = LMRunner(loaded, METHODS.get("streaming_llm", "kv").cls(n_keep=8), MeasureSettings(warmup=0))
    assert compressed.loglikelihood(ctx, cont)[0] != pytest.approx(ll, abs=1e-6)  # the method applies


# --- every registered kv method -------------------------------------------------------------------------


def test_builtin_kv_methods_registered() -> None:
    assert {"none", "random", "streaming_llm"} <= set(IDS)


@pytest.mark.parametrize("query_aware", [False, True])
@pytest.mark.parametrize("cls", KV_METHODS, ids=IDS)
def test_noop_at_keep_all_matches_none(loaded, cls, query_aware) -> None:
    p = prompt(1)
    ref = gen(loaded, NoneKV(query_aware=query_aware), p)
    for phase in cls.supported_phases if "phase" in init_fields(cls) else [None]:
        m = make(cls, query_aware=query_aware, phase=phase)
        assert m.is_noop()
        out = gen(loaded, m, p)
        assert torch.equal(out.tokens, ref.tokens), phase
        assert len(out.logits) == len(ref.logits) == 6
        for a, b in zip(out.logits, ref.logits):
            assert torch.equal(a, b), phase
        assert out.compression["achieved_keep_ratio"] == 1.0
        assert out.cache_len_end == ref.cache_len_end == [P + S + 5] * 2


@pytest.mark.parametrize("query_aware", [False, True])
@pytest.mark.parametrize("budget", [{"keep_ratio": 0.5}, {"n_keep": 7}], ids=["ratio", "n_keep"])
@pytest.mark.parametrize("cls", PREFILLERS, ids=[c.registered_name for c in PREFILLERS])
def test_budget_per_row_and_layer_with_padding(loaded, cls, budget, query_aware) -> None:
    """A left-padded batch of different lengths: after the compressed prefill every row, layer and KV head
    holds exactly its own budget of context tokens (padding never counted), plus the question when
    query-aware."""
    m = make(cls, phase="prefill", query_aware=query_aware, **budget)
    lengths = [40, 17, 29]
    cache = prefill(loaded, m, Prompt.batch(ragged(2, lengths)))
    n_layers = len(cache.layers)
    for i, layer in enumerate(cache.layers):
        for row, n in enumerate(lengths):
            want = m.layer_budget(m.budget(n), n, i, n_layers)
            held = layer.valid[row].sum(-1)  # per KV head
            assert held.tolist() == [want + (S if query_aware else 0)] * held.shape[0], (i, row)
            pos = layer.pos[row][layer.valid[row]]
            assert int(pos.max()) < n + (S if query_aware else 0)  # only real tokens, never padding


@pytest.mark.parametrize("cls", PREFILLERS, ids=[c.registered_name for c in PREFILLERS])
def test_cache_bytes_drop_in_proportion(loaded, cls) -> None:
    """Buffers are really smaller (not masked): allocated bytes = kept + question + decode room per layer."""
    m = make(cls, keep_ratio=0.25, phase="prefill")
    p = prompt(2, batch=2)
    out, full = gen(loaded, m, p, n=3, logits=False), gen(loaded, NoneKV(), p, n=3, logits=False)
    ptb = per_token_bytes(loaded, batch=2)
    kept = out.compression["kept_tokens_per_layer"]
    # allocated slots are rounded up to a multiple of SLOT_ALIGN (aligned rows keep tensor-core kernels)
    assert full.kv_cache_bytes == 2 * aligned(P + S + 3) * ptb
    assert out.kv_cache_bytes == sum(aligned(int(k) + S + 3) for k in kept) * ptb
    assert out.compression["kv_cache_bytes_used"] == sum(int(k) + S for k in kept) * ptb
    assert sum(kept) / len(kept) == pytest.approx(m.budget(P), abs=0.5)
    assert out.compression["achieved_keep_ratio"] == pytest.approx(sum(kept) / len(kept) / P)


@pytest.mark.parametrize("query_aware", [False, True])
@pytest.mark.parametrize("cls", CONFIGURABLE, ids=CIDS)
def test_batch_of_four_equals_four_single_runs(loaded, cls, query_aware) -> None:
    m = make(cls, keep_ratio=0.5, query_aware=query_aware)
    prompts = ragged(4, [40, 33, 21, 37], [6, 5, 6, 3])
    both = gen(loaded, m, Prompt.batch(prompts))
    for row, p in enumerate(prompts):
        alone = gen(loaded, m, p)
        assert torch.equal(both.tokens[row], alone.tokens[0]), row
        for a, b in zip(both.logits, alone.logits):
            torch.testing.assert_close(a[row], b[0], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("cls", PREFILLERS, ids=[c.registered_name for c in PREFILLERS])
def test_kept_entries_are_the_full_cache_entries(loaded, cls) -> None:
    """Eviction only selects: every live key/value equals the full cache's entry at its true position."""
    p = prompt(3, batch=2)
    full = prefill(loaded, NoneKV(), p)
    cache = prefill(loaded, make(cls, n_keep=9, phase="prefill"), p)
    for layer, ref in zip(cache.layers, full.layers):
        for b in range(2):
            for h in range(layer.keys.shape[1]):
                live = layer.valid[b, h]
                pos = layer.pos[b, h][live]
                assert torch.equal(layer.keys[b, h][live], ref.keys[b, h, pos])
                assert torch.equal(layer.values[b, h][live], ref.values[b, h, pos])


@pytest.mark.parametrize("phase", ["decode", "both"])
@pytest.mark.parametrize("cls", DECODERS, ids=[c.registered_name for c in DECODERS])
def test_decode_phase_holds_cache_at_capacity(loaded, cls, phase) -> None:
    m = make(cls, keep_ratio=0.5, phase=phase)
    out = gen(loaded, m, prompt(5), n=12, logits=False)
    comp = out.compression
    capacity = m.budget(P) + S  # the size right after a compressed prefill: kept context + question
    assert comp["decode_capacity"] == capacity
    assert out.cache_len_end == [capacity] * 2  # held there: 11 decode steps later, no growth
    if phase == "decode":
        assert comp["kept_tokens_per_layer"] == [P, P]  # the prefill itself was not compressed
        assert out.cache_len_start == [P + S] * 2
    else:
        assert out.cache_len_start == [m.budget(P) + S] * 2
    assert comp["achieved_keep_ratio"] == pytest.approx(m.budget(P) / P)


# --- validation ------------------------------------------------------------------------------------------


@dataclass
class _PrefillOnly(KVMethod):
    supported_phases: ClassVar[tuple[str, ...]] = ("prefill",)


@pytest.mark.parametrize("kw", [{"keep_ratio": 0.0}, {"keep_ratio": 1.5}, {"keep_ratio": -0.1},
                                {"n_keep": 0}, {"n_keep": -3}, {"phase": "sometimes"}])
@pytest.mark.parametrize("cls", [c for c in KV_METHODS if configurable(c)],
                         ids=[c.registered_name for c in KV_METHODS if configurable(c)])
def test_bad_budget_or_phase_raises(cls, kw) -> None:
    with pytest.raises(TokenbenchError) as err:
        cls(**kw)
    assert list(kw)[0] in str(err.value) and "\n" not in str(err.value)


def test_unsupported_phase_and_bad_n_sink() -> None:
    with pytest.raises(TokenbenchError, match="unsupported phase 'decode'"):
        _PrefillOnly(phase="decode")
    with pytest.raises(TokenbenchError, match="n_sink"):
        METHODS.get("streaming_llm", "kv").cls(n_sink=-1)
    with pytest.raises(TokenbenchError, match="takes no budget"):
        NoneKV(keep_ratio=0.5)  # the baseline has no budget
    with pytest.raises(TokenbenchError, match="takes no budget"):
        NoneKV(n_keep=10)


def test_nominal_budget_and_noop() -> None:
    sl = METHODS.get("streaming_llm", "kv").cls(keep_ratio=0.25)
    assert sl.nominal_budget() == {"keep_ratio": 0.25, "n_keep": None, "phase": "prefill"}
    assert not sl.is_noop() and METHODS.get("streaming_llm", "kv").cls().is_noop()
    assert not METHODS.get("random", "kv").cls(n_keep=1000).is_noop()
    assert sl.budget(10) == 2 and sl.budget(3) == 1 and sl.budget(0) == 0
    assert METHODS.get("random", "kv").cls(keep_ratio=0.3).budget(10) == 3  # no float round-up
    assert METHODS.get("random", "kv").cls(n_keep=50).budget(10) == 10


# --- method specific ------------------------------------------------------------------------------------


@pytest.mark.parametrize("query_aware", [False, True])
def test_streaming_llm_keeps_sinks_and_recent_window(loaded, query_aware) -> None:
    m = METHODS.get("streaming_llm", "kv").cls(n_keep=10, n_sink=4, query_aware=query_aware)
    expected = list(range(4)) + list(range(P - 6, P)) + (list(range(P, P + S)) if query_aware else [])
    cache = prefill(loaded, m, prompt(6, batch=2))
    for layer in cache.layers:
        assert live_positions(layer) == [[expected] * 2] * 2  # every row, every KV head


def test_streaming_llm_rolling_window_during_decode(loaded) -> None:
    """phase=both: after every decode step the live positions are the sinks plus the newest tokens."""
    m = METHODS.get("streaming_llm", "kv").cls(n_keep=8, n_sink=2, phase="both")
    capacity = 8 + S
    cache = EvictionCache(2)
    p = prompt(7)
    with torch.inference_mode(), m.attach(loaded.model, cache) as session:
        pos = torch.arange(P)[None]
        cache.set_inputs(pos, torch.ones_like(pos, dtype=torch.bool))
        with session.compressing(torch.ones(1, P, dtype=torch.bool), reserve=S):
            loaded.model(input_ids=p.prefix_ids, position_ids=pos, cache=cache)
        pos = torch.arange(P, P + S)[None]
        cache.set_inputs(pos, torch.ones_like(pos, dtype=torch.bool))
        tok = loaded.model(input_ids=p.suffix_ids, position_ids=pos, cache=cache).logits[:, -1].argmax(-1)
        with session.decoding(10):
            for step in range(10):
                at = P + S + step
                cache.set_inputs(torch.tensor([[at]]), torch.ones(1, 1, dtype=torch.bool))
                tok = loaded.model(input_ids=tok[:, None], position_ids=torch.tensor([[at]]),
                                   cache=cache).logits[:, -1].argmax(-1)
                window = list(range(at + 1 - (capacity - 2), at + 1))
                for layer in cache.layers:
                    assert live_positions(layer) == [[[0, 1] + window] * 2]
                    # one spare slot, reused every step (the buffer rounded up to SLOT_ALIGN slots)
                    assert layer.capacity == aligned(capacity + 1)


def test_random_is_deterministic_and_seed_dependent(loaded) -> None:
    cls = METHODS.get("random", "kv").cls
    p = prompt(8)
    a, b, c = (live_positions(prefill(loaded, cls(keep_ratio=0.5, seed=s), p).layers[0]) for s in (0, 0, 1))
    a1 = live_positions(prefill(loaded, cls(keep_ratio=0.5, seed=0), p).layers[1])
    assert a == b and a != c
    assert a != a1  # layers draw their own selection
    assert a[0][0] != a[0][1]  # and so do KV heads


@dataclass
class _NormScore(KVMethod):
    """Test-only: key norm as a score comparable across heads."""

    supports_adaptive_heads: ClassVar[bool] = True

    def score(self, ctx: ScoreContext) -> torch.Tensor:
        return ctx.keys.float().norm(dim=-1)


def test_adaptive_head_allocation_shares_the_layer_budget(loaded) -> None:
    """Ada-KV: each head keeps its top floor(0.2 k), the rest of the layer's k * H go to the best remaining
    (head, token) pairs over all heads — compared with a direct reference on the full cache's keys."""
    m = _NormScore(keep_ratio=0.25, head_allocation="adaptive")
    p = prompt(13, batch=2)
    full = prefill(loaded, NoneKV(), p)
    cache = prefill(loaded, m, p)
    k = m.budget(P)
    floor = int(k * 0.2)
    for layer, ref in zip(cache.layers, full.layers):
        h = layer.keys.shape[1]
        for b in range(2):
            scores = ref.keys[b].float().norm(dim=-1)  # (H, P)
            chosen = set()
            for head in range(h):
                chosen |= {(head, int(t)) for t in scores[head].topk(floor).indices}
            rest = sorted(((float(scores[hh, t]), hh, t) for hh in range(h) for t in range(P)
                           if (hh, t) not in chosen), reverse=True)
            chosen |= {(hh, t) for _, hh, t in rest[: k * h - len(chosen)]}
            got = {(head, int(t)) for head in range(h) for t in layer.pos[b, head][layer.valid[b, head]]}
            assert got == chosen
        held = layer.valid.sum(-1)
        assert held.sum(-1).tolist() == [k * h] * 2 and bool((held >= floor).all())
    with pytest.raises(TokenbenchError, match="adaptive"):
        METHODS.get("streaming_llm", "kv").cls(keep_ratio=0.5, head_allocation="adaptive")


# --- positions after eviction: compare with a full forward under an equivalent attention mask -----------


def _reference_logits(model, ids: torch.Tensor, visible: torch.Tensor) -> torch.Tensor:
    """One eager forward over ``ids`` (batch 1) with a 4-D additive mask built from ``visible[q, k]``."""
    mask = torch.zeros(visible.shape, dtype=torch.float32)
    mask[~visible] = torch.finfo(torch.float32).min
    with torch.inference_mode():
        return model(input_ids=ids, attention_mask=mask[None, None], use_cache=False).logits[0]


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("query_aware", [False, True])
@pytest.mark.parametrize("method", ["none", "streaming_llm"])
def test_generation_after_eviction_uses_true_positions(loaded, loaded_sdpa, method, query_aware, attn):
    """Evicting the middle of the context then decoding with explicit position_ids must equal a full forward
    in which the tokens after the compressed prefill cannot see the evicted positions (same RoPE phases).
    This pins the transformers 5.x behaviour the runner relies on (mask from cache length, RoPE from ids)."""
    n_new = 5
    kw = {"query_aware": query_aware}
    m = NoneKV(**kw) if method == "none" else METHODS.get("streaming_llm", "kv").cls(n_keep=12, n_sink=4, **kw)
    p = prompt(9)
    out = gen(loaded if attn == "eager" else loaded_sdpa, m, p, n=n_new)
    kept = set(range(P)) if method == "none" else set(range(4)) | set(range(P - 8, P))
    ids = torch.cat([p.prefix_ids, p.suffix_ids, out.tokens[:, : n_new - 1]], dim=1)
    total = ids.shape[1]
    visible = torch.tril(torch.ones(total, total, dtype=torch.bool))
    first_limited = P + S if query_aware else P  # query-aware: the question is inside the full prefill
    for q in range(first_limited, total):
        for k in range(P):
            if k not in kept:
                visible[q, k] = False
    ref = _reference_logits(loaded.model, ids, visible)
    for step in range(n_new):
        torch.testing.assert_close(out.logits[step][0], ref[P + S - 1 + step], atol=2e-4, rtol=1e-4)
    if method != "none":  # the test would catch a runner that let transformers derive positions
        assert out.compression["kept_tokens_per_layer"] == [12, 12]


def test_sdpa_over_a_compressed_cache_leaves_cudnn_out(loaded_sdpa, monkeypatch) -> None:
    """cuDNN's SDPA builds an execution plan per shape, and PyramidKV's layers each keep another length: a
    forward over a compressed cache (the question, query-agnostic) must run without cuDNN, while a prompt's
    own keys (fresh or left-padded: one shape for every layer) keep the default backends."""
    from tokenbench import kv_attention

    calls: list[tuple[int, int, bool]] = []
    sdpa = F.scaled_dot_product_attention

    def spy(query, key, *args, **kwargs):
        calls.append((query.shape[2], key.shape[2], torch.backends.cuda.cudnn_sdp_enabled()))
        return sdpa(query, key, *args, **kwargs)

    monkeypatch.setattr(kv_attention.F, "scaled_dot_product_attention", spy)
    assert torch.backends.cuda.cudnn_sdp_enabled()  # the default the prompt's forward keeps
    method = METHODS.get("pyramidkv", "kv").cls(keep_ratio=0.5, query_aware=False)
    for p in (prompt(1), Prompt.batch(ragged(3, [P, 30]))):
        calls.clear()
        gen(loaded_sdpa, method, p, n=2, logits=False)
        own = [c for c in calls if c[0] == c[1]]
        over_cache = [c for c in calls if c[0] == S and c[1] < c[0] + P]
        assert len(own) == 2 and len(over_cache) == 2, calls  # 2 layers: the prompt, then the question
        assert all(c[2] for c in own) and not any(c[2] for c in over_cache), calls
        assert torch.backends.cuda.cudnn_sdp_enabled()  # restored after each call


# --- the runner ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("use_template", [True, False])
def test_runner_run_records_everything(loaded, use_template) -> None:
    context = "The grass is green. The sky is blue. " * 6
    sample = Sample(id="s", context=context, question=" What color is the sky?", max_new_tokens=5)
    m = METHODS.get("streaming_llm", "kv").cls(keep_ratio=0.5)
    runner = LMRunner(loaded, m, MeasureSettings(warmup=1, repeats=2, fixed_output_tokens=8))
    pr = runner.build_prompt(sample, use_chat_template=use_template)
    prefix_text = loaded.tokenizer.decode(pr.prefix_ids[0])
    assert prefix_text.endswith(context)
    if use_template:
        assert prefix_text.startswith("<|im_start|>user\n")
        assert loaded.tokenizer.decode(pr.suffix_ids[0]).endswith("<|im_end|>\n<|im_start|>assistant\n")
    else:
        assert prefix_text == context
    out = runner.run(sample, use_chat_template=use_template)
    assert out.n_prompt_tokens == pr.n_prompt and out.n_context_tokens == pr.n_context
    assert 1 <= out.n_generated <= 5 and len(out.token_ids) == out.n_generated
    # the text exactly as generated, whitespace included (LongBench's code similarity reads indentation)
    assert out.text == loaded.tokenizer.decode(out.token_ids, skip_special_tokens=True)
    for k in ("prefill_ms", "ttft_ms", "tpot_ms", "e2e_ms"):
        assert out.latency[k] > 0 and out.latency[f"{k}_spread"] >= 0
    assert out.latency["ttft_ms"] >= out.latency["prefill_ms"]
    kept = m.budget(pr.n_context)
    question = pr.n_prompt - pr.n_context
    # two layers, each holding the kept context + the question, with room preallocated for 8 decode steps
    assert out.memory["kv_cache_bytes"] == 2 * aligned(kept + question + 8) * per_token_bytes(loaded)
    assert out.memory["kv_cache_bytes_used"] == 2 * (kept + question) * per_token_bytes(loaded)
    assert out.memory["kv_cache_bytes_end"] == out.memory["kv_cache_bytes"]  # no growth while decoding
    assert out.compression["context_tokens"] == pr.n_context
    assert 0.45 < out.compression["achieved_keep_ratio"] <= 0.5


def test_runner_stops_at_eos_but_times_fixed_length(loaded) -> None:
    runner = LMRunner(loaded, NoneKV(), MeasureSettings(warmup=0))
    p = prompt(10)
    probe = runner.generate(p, 1, 0, return_logits=True)
    first = int(probe.tokens[0, 0])
    runner.eos_ids = [first]
    runner._eos = torch.tensor([first])  # make the first generated token an EOS
    out = runner.generate(p, 20, 6)
    assert out.lengths == [1] and out.tokens.shape == (1, 6)  # prediction stopped, decoding went on
    assert out.latency["e2e_ms"] == out.latency["ttft_ms"]
    assert out.latency["tpot_ms"] > 0


def test_runner_rejects_other_families(loaded) -> None:
    from tokenbench.method import Method

    class Prompty(Method):
        family = "prompt"

    with pytest.raises(TokenbenchError, match="kv-family"):
        LMRunner(loaded, Prompty(), MeasureSettings())


@pytest.mark.parametrize("cls", CONFIGURABLE, ids=CIDS)
def test_prefill_in_row_groups_equals_one_batch(loaded, cls) -> None:
    """prefill_rows=1: rows prefilled and compressed one at a time, then decoded together — same tokens and
    logits as the one-batch prefill, with decode state merged into one cache."""
    m = make(cls, keep_ratio=0.5)
    p = Prompt.batch(ragged(14, [40, 26, 33], [6, 6, 4]))
    runner = LMRunner(loaded, m, MeasureSettings(warmup=0))
    whole = runner.generate(p, 6, 6, return_logits=True)
    rows = runner.generate(p, 6, 6, return_logits=True, prefill_rows=1)
    assert_same_generation(whole, rows)
    assert rows.compression["kept_tokens"] == whole.compression["kept_tokens"]
    assert rows.compression["achieved_keep_ratio"] == pytest.approx(whole.compression["achieved_keep_ratio"])


@pytest.mark.parametrize("name", ["none", "streaming_llm"])
def test_sdpa_decode_backend_matches_matmul(loaded, name, monkeypatch) -> None:
    """The fused SDPA decode path (used where no weights are needed) gives the explicit path's outputs."""
    from tokenbench import kv_attention

    m = NoneKV() if name == "none" else METHODS.get(name, "kv").cls(keep_ratio=0.5)
    p = Prompt.batch(ragged(15, [40, 27], [6, 6]))
    ref = gen(loaded, m, p)
    monkeypatch.setattr(kv_attention, "DECODE_BACKEND", "sdpa")
    assert_same_generation(gen(loaded, m, p), ref, tol=1e-5)


@pytest.mark.parametrize("name", ["none", "streaming_llm"] + DECODE_TIME)
def test_triton_decode_backend_matches_matmul(loaded, name, monkeypatch) -> None:
    """The split-KV Triton decode attention (interpreted on CPU) gives the explicit path's tokens and logits,
    and to decode-time methods the same attention weights, hence the same evictions."""
    pytest.importorskip("triton")
    from tokenbench import kv_attention

    m = NoneKV() if name == "none" else METHODS.get(name, "kv").cls(
        keep_ratio=0.5, **({"phase": "both"} if name in DECODE_TIME else {}))
    p = Prompt.batch(ragged(18, [40, 27], [6, 6]))
    ref = gen(loaded, m, p)
    monkeypatch.setattr(kv_attention, "DECODE_BACKEND", "triton")
    out = gen(loaded, m, p)
    assert_same_generation(out, ref, tol=1e-4)
    assert out.compression["cache_len_per_layer"] == ref.compression["cache_len_per_layer"]


@pytest.mark.parametrize("name", ["streaming_llm"] + DECODE_TIME)
def test_fused_kernels_keep_the_numerics(loaded_sdpa, monkeypatch, name) -> None:
    """measure.fuse_kernels (compiled RMSNorm/RoPE/MLP glue, decode attention and, for a decode-time method,
    its scoring and eviction step, compiled whole) leaves tokens and logits as they were."""
    import copy
    import sys

    from tokenbench import kv_attention
    from tokenbench.families import kv as kv_family

    if name not in IDS:
        pytest.skip(f"{name} not registered")
    # fusion swaps module-level functions (the model's RoPE, the decode attention, the eviction step): restore
    modeling = sys.modules[type(loaded_sdpa.model.model.layers[0].self_attn).__module__]
    monkeypatch.setattr(modeling, "apply_rotary_pos_emb", modeling.apply_rotary_pos_emb)
    monkeypatch.setattr(kv_attention, "DECODE_IMPL", list(kv_attention.DECODE_IMPL))
    monkeypatch.setattr(kv_family, "EVICT_IMPL", list(kv_family.EVICT_IMPL))
    from tokenbench import kv_cache

    monkeypatch.setattr(kv_cache, "WRITE_IMPL", list(kv_cache.WRITE_IMPL))

    m = METHODS.get(name, "kv").cls(keep_ratio=0.5, **({"phase": "both"} if name in DECODE_TIME else {}))
    p = Prompt.batch(ragged(16, [40, 30], [6, 6]))
    ref = gen(loaded_sdpa, m, p)
    fused_lm = copy.deepcopy(loaded_sdpa)
    runner = LMRunner(fused_lm, m, MeasureSettings(warmup=0, fuse_kernels=True))
    assert runner.fused["rms_norm"] == 5 and runner.fused["mlp"] == 2  # 2 layers x 2 norms + final; 2 MLPs
    assert runner.fused["qkv"] == 2 and runner.fused["add_norm_layers"] == 2
    attn = fused_lm.model.model.layers[0].self_attn
    assert attn.k_proj.weight.data_ptr() == attn.q_proj.weight.data_ptr() + attn.q_proj.weight.nbytes
    assert kv_family.EVICT_IMPL[0] is not kv_family.decode_evict  # the compiled scoring + eviction is in use
    assert kv_cache.WRITE_IMPL[0] is not kv_cache.write_decode
    assert_same_generation(runner.generate(p, 6, 6, return_logits=True), ref, tol=1e-5)
    # every forward's input norms after the first layer and its final norm came from the fused residual adds
    assert fused_lm.model._tokenbench_pending.hits > 0 and not fused_lm.model._tokenbench_pending.ahead


def test_fused_eviction_compiles_past_dynamos_default_limit(loaded_sdpa, monkeypatch) -> None:
    """Decode-time methods x cache shapes in one process (a sweep): the compiled eviction step gets exactly one
    static variant per method and shape (none per step: the steps of a shape share it); past dynamo's default of
    8 variants fullgraph=True fails hard (the H200 grid's tova, h2o and scissorhands rows did), so fused_decode
    raises the limit. Dynamo's eager backend: the same guards and variants, no code generation."""
    import copy
    import sys

    from tokenbench import fused_decode, kv_attention, kv_cache
    from tokenbench.families import kv as kv_family

    if len(DECODE_TIME) < 2:
        pytest.skip("needs two decode-time methods")
    modeling = sys.modules[type(loaded_sdpa.model.model.layers[0].self_attn).__module__]
    monkeypatch.setattr(modeling, "apply_rotary_pos_emb", modeling.apply_rotary_pos_emb)
    for module, name in ((kv_attention, "DECODE_IMPL"), (kv_family, "EVICT_IMPL"), (kv_cache, "WRITE_IMPL")):
        monkeypatch.setattr(module, name, list(getattr(module, name)))
    monkeypatch.setattr(fused_decode, "_compiled", {})
    monkeypatch.setattr(fused_decode, "COMPILE_BACKEND", "eager")
    monkeypatch.setattr(torch._dynamo.config, "recompile_limit", 8)  # the default, whatever ran before
    code = kv_family.decode_evict.__code__
    torch._dynamo.reset()
    try:
        fused_lm = copy.deepcopy(loaded_sdpa)
        variants = 0
        for i, name in enumerate(DECODE_TIME):
            m = METHODS.get(name, "kv").cls(keep_ratio=0.5, phase="both")
            for j, lengths in enumerate(([40, 27], [64, 31], [90, 50], [23, 17], [130, 70])):
                p = Prompt.batch(ragged(30 + 7 * i + j, lengths, [6, 6]))
                out = LMRunner(fused_lm, m, MeasureSettings(warmup=0, fuse_kernels=True)).generate(p, 10, 10)
                assert len(out.tokens[0]) == 10
                before, variants = variants, len(torch._dynamo.eval_frame._debug_get_cache_entry_list(code))
                # a new shape is a new static variant (symbolic shapes would serve it from an old one); at a
                # method's first shape a per-layer int (random's seed key) may add one symbolic in that int
                assert variants - before == 1 or (j == 0 and variants - before == 2), (name, lengths)
        assert variants > 8  # the sweep outgrew dynamo's default limit
        assert torch._dynamo.config.recompile_limit == fused_decode.RECOMPILE_LIMIT
    finally:
        torch._dynamo.reset()


def test_merge_keeps_method_state_of_groups_that_never_evicted(loaded) -> None:
    """Row groups where only some evicted at prefill (a short row under an absolute budget): the merged cache
    carries each row's own per-slot state, zero for rows that had none (h2o-style accumulated attention)."""
    if "h2o" not in IDS:
        pytest.skip("h2o not registered")
    m = METHODS.get("h2o", "kv").cls(n_keep=30)
    for lengths in ([40, 20], [20, 40]):
        p = Prompt.batch(ragged(17, lengths, [6, 6]))
        runner = LMRunner(loaded, m, MeasureSettings(warmup=0))
        whole = runner.generate(p, 6, 6, return_logits=True)
        assert_same_generation(whole, runner.generate(p, 6, 6, return_logits=True, prefill_rows=1))


def test_fused_qkv_projection_with_biases_and_foreign_inputs() -> None:
    """The one-GEMM query/key/value projection (fused_decode._fused_qkv) on a model with q/k/v biases (Qwen2):
    same projections as the three Linear layers, and k_proj/v_proj called on another input compute their own."""
    from transformers import Qwen2Config
    from transformers.models.qwen2.modeling_qwen2 import Qwen2Attention

    from tokenbench import fused_decode

    cfg = Qwen2Config(hidden_size=32, num_attention_heads=4, num_key_value_heads=2, intermediate_size=64)
    torch.manual_seed(0)
    attn = Qwen2Attention(cfg, layer_idx=0)
    assert attn.q_proj.bias is not None
    x, other = torch.randn(2, 3, 32), torch.randn(2, 3, 32)
    ref = [F.linear(t, p.weight, p.bias) for p in (attn.q_proj, attn.k_proj, attn.v_proj) for t in (x, other)]
    assert fused_decode._fused_qkv(attn)
    got = [attn.q_proj(x), attn.k_proj(x), attn.v_proj(x)]  # the attention module's order: one GEMM
    got_other = [attn.q_proj(other), attn.k_proj(x), attn.v_proj(other)]  # k_proj on x: not the stashed input
    for g, r in zip(got, ref[0::2]):
        torch.testing.assert_close(g, r)
    torch.testing.assert_close(got_other[0], ref[1])
    torch.testing.assert_close(got_other[1], ref[2])  # computed by itself
    torch.testing.assert_close(got_other[2], ref[5])


def test_compiled_greedy_pick_is_argmax_with_its_ties() -> None:
    """fused_decode.greedy (the decode loop's compiled pick): torch.argmax's index, the first of tied maxima."""
    from tokenbench import fused_decode

    g = torch.Generator().manual_seed(3)
    logits = torch.randn(4, 1000, generator=g)
    logits[1, [7, 500, 999]] = 10.0  # a three-way tie
    logits[2] = 0.0  # all tied
    logits[3, [70, 900]] = 10.0  # tied across the two-stage pick's slices
    got = fused_decode.greedy()(logits)
    assert torch.equal(got, logits.argmax(dim=-1)) and got.tolist()[1:] == [7, 0, 70]
    odd = torch.randn(3, 1001, generator=g)  # a vocabulary that is not a multiple of the slices
    odd[0, 1000] = 50.0
    assert torch.equal(fused_decode.greedy()(odd), odd.argmax(dim=-1))
