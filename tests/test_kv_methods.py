"""KV-cache family: every registered kv method is checked automatically (no-op at keep-all, budget, real cache
shrinkage, batch rows), plus method-specific behaviour and the explicit-position decoding after eviction."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import ClassVar

import pytest
import torch
from tokenbench.config import MeasureSettings
from tokenbench.errors import TokenbenchError
from tokenbench.families.kv import KVMethod
from tokenbench.lm import LMRunner, Prompt
from tokenbench.measure import cache_lengths
from tokenbench.models.tiny import TinyLlama
from tokenbench.registry import METHODS, load_all
from tokenbench.task import Sample

load_all()

KV_METHODS = sorted({e.cls for n in METHODS.names() for e in METHODS.entries(n) if e.family == "kv"},
                    key=lambda c: c.registered_name)
IDS = [c.registered_name for c in KV_METHODS]
NoneKV = METHODS.get("none", "kv").cls
P, S = 40, 6  # prefix (compressible) and suffix lengths of the synthetic prompts


def init_fields(cls: type) -> set[str]:
    return {f.name for f in dataclasses.fields(cls) if f.init}


def configurable(cls: type) -> bool:
    return cls.takes_budget and {"keep_ratio", "n_keep"} <= init_fields(cls)


DECODERS = [c for c in KV_METHODS if configurable(c) and "decode" in c.supported_phases]


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


def gen(loaded, method, p: Prompt, n: int = 6, logits: bool = True):
    return LMRunner(loaded, method, MeasureSettings(warmup=0)).generate(p, n, n, return_logits=logits)


def per_token_bytes(loaded, batch: int = 1) -> int:
    cfg = loaded.model.config
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    return cfg.num_hidden_layers * 2 * batch * cfg.num_key_value_heads * head_dim * 4  # float32


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
@pytest.mark.parametrize("cls", [c for c in KV_METHODS if configurable(c)],
                         ids=[c.registered_name for c in KV_METHODS if configurable(c)])
def test_budget_respected_and_cache_shrinks(loaded, cls, budget, query_aware) -> None:
    if "prefill" not in cls.supported_phases:
        pytest.skip("no prefill phase")
    m = make(cls, phase="prefill", query_aware=query_aware, **budget)
    k = m.budget(P)
    assert k == (20 if "keep_ratio" in budget else 7)
    p = prompt(2, batch=2)  # two different rows of identical length
    out = gen(loaded, m, p, n=3, logits=False)
    comp = out.compression
    held = k + (S if query_aware else 0)  # the question is never evicted
    assert comp["cache_len_per_layer"] == [held, held]
    assert comp["kept_tokens"] == k and comp["context_tokens"] == P
    assert comp["achieved_keep_ratio"] == pytest.approx(k / P)
    # at the start of decoding the cache holds the kept context + the question, for both rows
    assert out.cache_len_start == [k + S] * 2
    full = gen(loaded, NoneKV(query_aware=query_aware), p, n=3, logits=False)
    assert full.kv_cache_bytes == (P + S) * per_token_bytes(loaded, batch=2)
    assert out.kv_cache_bytes == (k + S) * per_token_bytes(loaded, batch=2)  # really gone, not masked


def _session_prefill(loaded, method, p: Prompt):
    """Prefill through a session directly; returns (session, cache) with the hooks already removed."""
    from transformers import DynamicCache

    model = loaded.model
    cache = DynamicCache(config=model.config)
    ids = torch.cat([p.prefix_ids, p.suffix_ids], 1) if method.query_aware else p.prefix_ids
    with torch.inference_mode(), method.attach(model) as session:
        with session.compressing(p.prefix_ids.shape[1]):
            model(input_ids=ids, position_ids=torch.arange(ids.shape[1]).unsqueeze(0), past_key_values=cache,
                  use_cache=True)
        positions = [session.positions(i) for i in range(len(cache.layers))]
    return session, cache, positions


@pytest.mark.parametrize("cls", [c for c in KV_METHODS if configurable(c)],
                         ids=[c.registered_name for c in KV_METHODS if configurable(c)])
def test_kept_entries_are_the_full_cache_entries(loaded, cls) -> None:
    """Eviction only selects: every kept key/value equals the full cache's entry at its recorded position,
    per batch row and KV head, and positions stay in order."""
    p = prompt(3, batch=2)
    _, full, _ = _session_prefill(loaded, NoneKV(), p)
    _, cache, positions = _session_prefill(loaded, make(cls, n_keep=9, phase="prefill"), p)
    for i, (layer, pos) in enumerate(zip(cache.layers, positions)):
        assert pos.shape == (2, 2, 9)
        assert bool((pos[..., 1:] > pos[..., :-1]).all())
        idx = pos.unsqueeze(-1).expand(-1, -1, -1, layer.keys.shape[-1])
        ref = full.layers[i]
        assert torch.equal(layer.keys, ref.keys.gather(2, idx))
        assert torch.equal(layer.values, ref.values.gather(2, idx))


@pytest.mark.parametrize("query_aware", [False, True])
@pytest.mark.parametrize("cls", [c for c in KV_METHODS if configurable(c)],
                         ids=[c.registered_name for c in KV_METHODS if configurable(c)])
def test_batch_row_equals_prompt_alone(loaded, cls, query_aware) -> None:
    m = make(cls, keep_ratio=0.5, phase="prefill", query_aware=query_aware)
    both = gen(loaded, m, prompt(4, batch=2))
    for row in (0, 1):
        rows = prompt(4, batch=2)
        alone_prompt = Prompt(rows.prefix_ids[row:row + 1], rows.suffix_ids[row:row + 1])
        alone = gen(loaded, m, alone_prompt)
        assert torch.equal(both.tokens[row], alone.tokens[0])
        for a, b in zip(both.logits, alone.logits):
            torch.testing.assert_close(a[row], b[0], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("phase", ["decode", "both"])
@pytest.mark.parametrize("cls", DECODERS, ids=[c.registered_name for c in DECODERS])
def test_decode_phase_holds_cache_at_capacity(loaded, cls, phase) -> None:
    m = make(cls, keep_ratio=0.5, phase=phase)
    out = gen(loaded, m, prompt(5), n=12, logits=False)
    comp = out.compression
    capacity = m.budget(P) + S  # the size right after a compressed prefill: kept context + question
    assert comp["decode_capacity"] == capacity
    assert comp["decode_max_cache_len_per_layer"] == [capacity] * 2  # never above it
    assert out.cache_len_end == [capacity] * 2  # and held there: 11 decode steps later, no growth
    assert out.kv_cache_bytes_end == capacity * per_token_bytes(loaded)
    if phase == "decode":
        assert comp["cache_len_per_layer"] == [P, P]  # the prefill itself was not compressed
        assert out.cache_len_start == [P + S] * 2
    else:
        assert comp["cache_len_per_layer"] == [m.budget(P)] * 2
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
        METHODS.get("streaming_llm").cls(n_sink=-1)
    with pytest.raises(TokenbenchError, match="takes no budget"):
        NoneKV(keep_ratio=0.5)  # the baseline has no budget
    with pytest.raises(TokenbenchError, match="takes no budget"):
        NoneKV(n_keep=10)


def test_nominal_budget_and_noop() -> None:
    sl = METHODS.get("streaming_llm").cls(keep_ratio=0.25)
    assert sl.nominal_budget() == {"keep_ratio": 0.25, "n_keep": None, "phase": "prefill"}
    assert not sl.is_noop() and METHODS.get("streaming_llm").cls().is_noop()
    assert not METHODS.get("random").cls(n_keep=1000).is_noop()
    assert sl.budget(10) == 2 and sl.budget(3) == 1 and sl.budget(0) == 0
    assert METHODS.get("random").cls(keep_ratio=0.3).budget(10) == 3  # no float round-up
    assert METHODS.get("random").cls(n_keep=50).budget(10) == 10


# --- method specific ------------------------------------------------------------------------------------


@pytest.mark.parametrize("query_aware", [False, True])
def test_streaming_llm_keeps_sinks_and_recent_window(loaded, query_aware) -> None:
    cls = METHODS.get("streaming_llm").cls
    m = cls(n_keep=10, n_sink=4, query_aware=query_aware)
    p = prompt(6, batch=2)
    expected = list(range(4)) + list(range(P - 6, P)) + (list(range(P, P + S)) if query_aware else [])
    _, full, _ = _session_prefill(loaded, NoneKV(query_aware=query_aware), p)
    _, cache, positions = _session_prefill(loaded, m, p)
    for i, pos in enumerate(positions):
        assert pos.tolist() == [[expected] * 2] * 2  # every row, every KV head
        assert torch.equal(cache.layers[i].keys, full.layers[i].keys[:, :, expected])
        assert torch.equal(cache.layers[i].values, full.layers[i].values[:, :, expected])


def test_streaming_llm_rolling_window_during_decode(loaded) -> None:
    from transformers import DynamicCache

    m = METHODS.get("streaming_llm").cls(n_keep=8, n_sink=2, phase="both")
    model, p = loaded.model, prompt(7)
    cache = DynamicCache(config=model.config)
    capacity = 8 + S
    with torch.inference_mode(), m.attach(model) as session:
        with session.compressing(P):
            model(input_ids=p.prefix_ids, position_ids=torch.arange(P)[None], past_key_values=cache,
                  use_cache=True)
        out = model(input_ids=p.suffix_ids, position_ids=torch.arange(P, P + S)[None], past_key_values=cache)
        tok = out.logits[:, -1].argmax(-1, keepdim=True)
        with session.decoding():
            for step in range(10):
                pos = P + S + step
                out = model(input_ids=tok, position_ids=torch.tensor([[pos]]), past_key_values=cache)
                tok = out.logits[:, -1].argmax(-1, keepdim=True)
                assert cache_lengths(cache) == [capacity, capacity]
                window = list(range(pos + 1 - (capacity - 2), pos + 1))
                assert session.positions(0)[0, 0].tolist() == [0, 1] + window


def test_random_is_deterministic_and_seed_dependent(loaded) -> None:
    cls = METHODS.get("random").cls
    p = prompt(8)
    a = _session_prefill(loaded, cls(keep_ratio=0.5, seed=0), p)[2]
    b = _session_prefill(loaded, cls(keep_ratio=0.5, seed=0), p)[2]
    c = _session_prefill(loaded, cls(keep_ratio=0.5, seed=1), p)[2]
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not all(torch.equal(x, y) for x, y in zip(a, c))
    assert not torch.equal(a[0], a[1])  # layers draw their own selection
    assert not torch.equal(a[0][:, 0], a[0][:, 1])  # and so do KV heads


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
    m = NoneKV(**kw) if method == "none" else METHODS.get("streaming_llm").cls(n_keep=12, n_sink=4, **kw)
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
        assert out.compression["cache_len_per_layer"][0] == 12 + (S if query_aware else 0)


# --- the runner ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("use_template", [True, False])
def test_runner_run_records_everything(loaded, use_template) -> None:
    context = "The grass is green. The sky is blue. " * 6
    sample = Sample(id="s", context=context, question=" What color is the sky?", max_new_tokens=5)
    m = METHODS.get("streaming_llm").cls(keep_ratio=0.5)
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
    assert isinstance(out.text, str) and out.text == out.text.strip()
    for k in ("prefill_ms", "ttft_ms", "tpot_ms", "e2e_ms"):
        assert out.latency[k] > 0 and out.latency[f"{k}_spread"] >= 0
    assert out.latency["ttft_ms"] >= out.latency["prefill_ms"]
    kept = m.budget(pr.n_context)
    assert out.memory["kv_cache_bytes"] == (kept + pr.n_prompt - pr.n_context) * per_token_bytes(loaded)
    assert out.memory["kv_cache_bytes_end"] > out.memory["kv_cache_bytes"]  # 7 more tokens after decoding 8
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
