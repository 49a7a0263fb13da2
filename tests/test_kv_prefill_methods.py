"""The prefill-time KV methods snapkv, pyramidkv, knorm, observed_attention, expected_attention and vatp: each
idea on hand-built tensors (``ScoreContext.synthetic``, checked against direct re-computations of the papers'
formulas), then one generation of each through the real runner on the tiny model. The generic guarantees
(no-op at keep-all, budgets with padding, batch == single, cache bytes) are in ``test_kv_methods.py``."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F
from tokenbench.config import MeasureSettings
from tokenbench.errors import TokenbenchError
from tokenbench.families.kv import ScoreContext
from tokenbench.kv_cache import EvictionCache
from tokenbench.lm import LMRunner, Prompt
from tokenbench.models.tiny import TinyLlama
from tokenbench.registry import METHODS, load_all

load_all()

NAMES = ["snapkv", "pyramidkv", "knorm", "observed_attention", "expected_attention", "vatp"]
P, S = 40, 6  # context (compressible) and question lengths of the runner prompts


def method(name: str, **kw):
    return METHODS.get(name, "kv").cls(**kw)


def randn(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    return torch.cat([-x[..., x.shape[-1] // 2:], x[..., : x.shape[-1] // 2]], dim=-1)


def softmax_rows(q: torch.Tensor, k: torch.Tensor, qpos: torch.Tensor) -> torch.Tensor:
    """Plain causal attention weights of queries at ``qpos`` over keys at 0..C-1, GQA by repetition:
    ``(B, Hq, q, C)``."""
    k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
    logits = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    future = torch.arange(k.shape[2]).view(1, -1) > qpos.view(-1, 1)
    return logits.masked_fill(future, float("-inf")).softmax(dim=-1)


def group_mean(x: torch.Tensor, h: int) -> torch.Tensor:
    return x.view(x.shape[0], h, -1, *x.shape[2:]).mean(dim=2)


# --- snapkv ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("pooling", ["maxpool", "avgpool"])
def test_snapkv_equals_the_reference_formula(pooling) -> None:
    """Window of the last w queries, their attention summed over the window, averaged over the GQA group,
    pooled over the tokens before the window only (zero/-inf padding), the window above everything."""
    b, hq, h, c, d, w, kernel = 2, 4, 2, 30, 8, 6, 5
    q, k = randn(b, hq, 10, d, seed=1), randn(b, h, c, d, seed=2)
    m = method("snapkv", keep_ratio=0.5, window_size=w, kernel_size=kernel, pooling=pooling)
    scores = m.score(ScoreContext.synthetic(q, k))
    votes = group_mean(softmax_rows(q[:, :, -w:], k, torch.arange(c - w, c))[..., : c - w].sum(dim=2), h)
    pool = F.max_pool1d if pooling == "maxpool" else F.avg_pool1d
    ref = pool(votes, kernel, stride=1, padding=kernel // 2)
    torch.testing.assert_close(scores[..., : c - w], ref + 1e-3 * votes)  # + the tie-break on own votes
    window = scores[..., c - w:]
    assert bool((window.amin(dim=-1) > scores[..., : c - w].amax(dim=-1)).all())
    assert bool((window.diff(dim=-1) > 0).all())  # a budget below the window keeps its latest tokens


def test_snapkv_keeps_what_the_window_attends_to_and_its_neighbours() -> None:
    c, d, w = 24, 8, 4
    u = torch.zeros(d)
    u[0] = 1.0
    k = 0.1 * randn(1, 1, c, d, seed=3)
    k[0, 0, 9] = 6 * u  # the token every window query looks at
    q = (3 * u).expand(1, 1, w, d).clone()
    ctx = ScoreContext.synthetic(q, k)
    maxed = method("snapkv", keep_ratio=0.5, window_size=w, kernel_size=3).score(ctx)[0, 0]
    order = maxed.argsort(descending=True).tolist()
    assert set(order[:w]) == set(range(c - w, c))  # the window first
    assert order[w] == 9 and set(order[w + 1: w + 3]) == {8, 10}  # then the peak, then its neighbours
    alone = method("snapkv", keep_ratio=0.5, window_size=w, kernel_size=1).score(ctx)[0, 0]
    assert alone.argsort(descending=True).tolist()[w] == 9
    assert alone[8] < maxed[8] / 10 and alone[10] < maxed[10] / 10  # without pooling no spreading


def test_snapkv_rejects_bad_parameters() -> None:
    for kw, word in [({"kernel_size": 4}, "kernel_size"), ({"window_size": 0}, "window_size"),
                     ({"pooling": "median"}, "pooling")]:
        with pytest.raises(TokenbenchError, match=word) as err:
            method("snapkv", **kw)
        assert "\n" not in str(err.value)
    with pytest.raises(TokenbenchError, match="beta"):
        method("pyramidkv", beta=0.5)


# --- pyramidkv ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n, budget", [(1000, 100), (1000, 37), (200, 150), (64, 63)])
@pytest.mark.parametrize("query_aware", [False, True])
def test_pyramidkv_budgets_decrease_with_depth_and_average_to_the_budget(n, budget, query_aware) -> None:
    m = method("pyramidkv", n_keep=budget, window_size=8, beta=20, query_aware=query_aware)
    layers = 7
    plan = [m.layer_budget(budget, n, i, layers) for i in range(layers)]
    assert sum(plan) == budget * layers  # the mean is exactly the nominal budget
    assert all(a >= b for a, b in itertools.pairwise(plan)) and plan[0] > plan[-1]
    assert plan[0] <= n
    f = 0 if query_aware else 8  # the window, kept in every layer on top of the pyramid
    m_ = budget - f
    lo, hi = m_ / 20, 2 * m_ - m_ / 20
    if hi > n - f:  # the reference's cap: the bottom layer keeps everything
        hi, lo = n - f, 2 * m_ - (n - f)
    for i, got in enumerate(plan):  # the exact linear shares, rounded by at most one token
        assert abs(got - (f + hi - i * (hi - lo) / (layers - 1))) < 1
    assert m.layer_budget(budget, n, 0, 1) == budget and m.layer_budget(n, n, 0, layers) == n


# --- knorm ----------------------------------------------------------------------------------------------


def test_knorm_keeps_the_lowest_norm_keys() -> None:
    norms = torch.tensor([3.0, 0.5, 2.0, 0.1, 5.0, 1.0])
    k = F.normalize(randn(1, 1, 6, 4, seed=4), dim=-1) * norms.view(1, 1, 6, 1)
    scores = method("knorm", keep_ratio=0.5).score(ScoreContext.synthetic(randn(1, 1, 2, 4), k))
    assert scores[0, 0].topk(3).indices.sort().values.tolist() == [1, 3, 5]


# --- observed_attention ---------------------------------------------------------------------------------


def test_observed_attention_averages_over_the_queries_that_see_each_token() -> None:
    b, hq, h, c, d, nq = 2, 4, 2, 12, 8, 7
    q, k = randn(b, hq, nq, d, seed=5), randn(b, h, c, d, seed=6)
    ctx = ScoreContext.synthetic(q, k)  # queries at positions 5..11
    ctx.query_valid = torch.tensor([[True] * nq, [False, False] + [True] * (nq - 2)])  # row 1: 2 padded
    scores = method("observed_attention", keep_ratio=0.5).score(ctx)
    for row in range(b):
        qpos = torch.arange(c - nq, c)[ctx.query_valid[row]]
        attn = softmax_rows(q[row:row + 1, :, ctx.query_valid[row]], k[row:row + 1], qpos)
        seen = (qpos.view(-1, 1) >= torch.arange(c)).sum(dim=0)  # kvpress: n_tokens - i for a full prompt
        ref = group_mean(attn.sum(dim=2), h)[0] / seen
        torch.testing.assert_close(scores[row], ref)
    assert seen.tolist() == [5] * 7 + [5, 4, 3, 2, 1]  # row 1: 5 real queries, at positions 7..11


# --- expected_attention ---------------------------------------------------------------------------------


def _rotary(d: int):
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    return LlamaRotaryEmbedding(LlamaConfig(hidden_size=4 * d, num_attention_heads=4, head_dim=d))


@pytest.mark.parametrize("use_covariance", [True, False])
def test_expected_attention_equals_the_gaussian_formula(use_covariance) -> None:
    """Statistics of the pre-RoPE queries (sinks left out), rotated by the RoPE matrix averaged over the next
    positions, exp(s k.mu + s^2/2 k^T S k) softmaxed over the non-sink keys, group mean, times ||v||_2;
    sinks first. Queries are given post-RoPE, as cached, so the un-rotation is checked too."""
    b, hq, h, c, d, n_sink, n_future = 2, 4, 2, 20, 8, 3, 16
    rotary = _rotary(d)
    pre = randn(b, hq, c, d, seed=7) + 0.5  # a mean away from zero
    k, v = randn(b, h, c, d, seed=8), randn(b, h, c, d, seed=9)
    pos = torch.arange(c).expand(b, c)
    cos, sin = (t.unsqueeze(1) for t in rotary(pre, pos))
    ctx = ScoreContext.synthetic(pre * cos + rotate_half(pre) * sin, k, values=v)
    ctx.rotary = rotary
    m = method("expected_attention", keep_ratio=0.5, n_sink=n_sink, n_future_positions=n_future,
               use_covariance=use_covariance, epsilon=0.01)
    scores = m.score(ctx)

    x = pre[:, :, n_sink:]
    mu = x.mean(dim=2)
    cov = (x - mu.unsqueeze(2)).transpose(-1, -2) @ (x - mu.unsqueeze(2)) / x.shape[2]
    fcos, fsin = rotary(pre, torch.arange(c, c + n_future).expand(b, n_future))
    eye = torch.eye(d)
    rope_t = lambda i, t: (eye * fcos[i, t] + rotate_half(eye) * fsin[i, t]).T  # column j: R_t e_j
    rot = torch.stack([torch.stack([rope_t(i, t) for t in range(n_future)]) for i in range(b)]).mean(dim=1)
    mu_f = torch.einsum("bij,bhj->bhi", rot, mu)
    cov_f = rot.unsqueeze(1) @ cov @ rot.transpose(-1, -2).unsqueeze(1)
    kr = k.repeat_interleave(hq // h, dim=1)
    logit = (kr @ mu_f.unsqueeze(-1)).squeeze(-1) / math.sqrt(d)
    if use_covariance:
        logit = logit + ((kr @ cov_f) * kr).sum(dim=-1) / d / 2
    probs = group_mean(logit[..., n_sink:].softmax(dim=-1), h)
    ref = (probs + 0.01) * v[:, :, n_sink:].norm(dim=-1)
    torch.testing.assert_close(scores[..., n_sink:], ref, rtol=1e-4, atol=1e-6)
    sinks = scores[..., :n_sink]
    assert bool((sinks.amin(dim=-1) > ref.amax(dim=-1)).all()) and bool((sinks.diff(dim=-1) < 0).all())


def test_expected_attention_prefers_keys_along_the_query_mean_and_large_values() -> None:
    c, d = 12, 8
    rotary = _rotary(d)
    pre = torch.zeros(1, 1, c, d)
    pre[..., 3] = 4.0  # every query points along dimension 3 (the slowest RoPE pair: barely rotated)
    cos, sin = (t.unsqueeze(1) for t in rotary(pre, torch.arange(c).view(1, c)))
    k = torch.zeros(1, 1, c, d)
    k[0, 0, 6, 3] = k[0, 0, 8, 3] = 3.0  # two keys along the query mean
    v = torch.ones(1, 1, c, d)
    v[0, 0, 8] *= 2  # ... the second with a larger value
    ctx = ScoreContext.synthetic(pre * cos + rotate_half(pre) * sin, k, values=v)
    ctx.rotary = rotary
    order = method("expected_attention", keep_ratio=0.5, n_sink=2, n_future_positions=4).score(ctx)[0, 0]
    assert order.argsort(descending=True).tolist()[:4] == [0, 1, 8, 6]  # sinks, then value-weighted


# --- vatp -----------------------------------------------------------------------------------------------


def test_vatp_weighs_attention_by_value_l1_norm_and_keeps_sinks_and_the_recent_window() -> None:
    c, d = 16, 4
    k = torch.zeros(1, 1, c, d)  # one query at the end, equal keys: every token gets attention 1/c
    v = torch.ones(1, 1, c, d)
    v[0, 0, 5] = torch.tensor([3.0, -3.0, 3.0, -3.0])  # L1 norm 12
    v[0, 0, 9] = torch.tensor([5.0, 0.0, 0.0, 0.0])  # L1 norm 5 (the others: 4)
    v[0, 0, 0] = 1e-3  # a sink with a tiny value: kept anyway
    ctx = ScoreContext.synthetic(randn(1, 1, 1, d), k, values=v, budget=6)
    scores = method("vatp", keep_ratio=0.5, n_sink=1, recent_ratio=0.5).score(ctx)[0, 0]
    order = scores.argsort(descending=True).tolist()
    assert order[0] == 0  # the sink first
    assert set(order[1:4]) == {13, 14, 15}  # then the recent window: half of the budget of 6
    assert order[4:6] == [5, 9]  # then attention (tied) x L1 norm: 12 > 5 > 4
    # the attention ties, so the value norm alone decides
    torch.testing.assert_close(scores[5] / scores[9], torch.tensor(12 / 5))


def test_vatp_accumulates_attention_over_all_queries() -> None:
    b, hq, h, c, d = 1, 2, 1, 10, 8
    q, k, v = randn(b, hq, c, d, seed=10), randn(b, h, c, d, seed=11), randn(b, h, c, d, seed=12)
    scores = method("vatp", keep_ratio=0.5, n_sink=0, recent_ratio=0.0).score(
        ScoreContext.synthetic(q, k, values=v, budget=5))
    ref = group_mean(softmax_rows(q, k, torch.arange(c)).sum(dim=2), h) * v.abs().sum(dim=-1)
    torch.testing.assert_close(scores, ref)


# --- through the real runner ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def loaded():
    return TinyLlama(num_hidden_layers=2).load()


def prompt(seed: int = 0) -> Prompt:
    ids = torch.randint(3, 390, (1, P + S), generator=torch.Generator().manual_seed(seed))
    return Prompt(ids[:, :P], ids[:, P:])


def generate(loaded, m, n: int = 4):
    return LMRunner(loaded, m, MeasureSettings(warmup=0)).generate(prompt(), n, n, return_logits=True)


@pytest.fixture(scope="module")
def baseline(loaded):
    return generate(loaded, method("none"))


@pytest.mark.parametrize("name", NAMES)
def test_each_method_runs_through_the_runner(loaded, baseline, name) -> None:
    extra = {"window_size": 4} if name == "pyramidkv" else {}
    m = method(name, keep_ratio=0.5, **extra)
    out = generate(loaded, m)
    plan = [m.layer_budget(m.budget(P), P, i, 2) for i in range(2)]
    assert out.compression["kept_tokens_per_layer"] == plan
    assert out.cache_len_start == [k + S for k in plan]
    assert sum(plan) == 2 * (P // 2)
    assert out.tokens.shape == (1, 4)
    assert any(not torch.equal(a, b) for a, b in zip(out.logits, baseline.logits))  # eviction took effect
    if name == "pyramidkv":
        assert plan == [35, 5]  # window 4 in both layers + the pyramid 31/1 (beta 20, mean 16)
    else:
        assert plan == [P // 2] * 2


def _prefill(loaded, m) -> EvictionCache:
    p = prompt(1)
    model = loaded.model
    cache = EvictionCache(model.config.num_hidden_layers)
    pos = torch.arange(P).view(1, P)
    with torch.inference_mode(), m.attach(model, cache) as session:
        cache.set_inputs(pos, torch.ones(1, P, dtype=torch.bool))
        with session.compressing(torch.ones(1, P, dtype=torch.bool)):
            model(input_ids=p.prefix_ids, position_ids=pos, cache=cache, use_cache=True)
    return cache


def test_knorm_on_the_model_keeps_the_lowest_norm_keys_and_can_skip_layers(loaded) -> None:
    full = _prefill(loaded, method("none"))
    cache = _prefill(loaded, method("knorm", n_keep=10, skip_layers=1))
    assert cache.lengths() == [P, 10]  # layer 0 skipped (the paper skips the first two)
    layer, ref = cache.layers[1], full.layers[1]
    for head in range(layer.keys.shape[1]):
        want = ref.keys[0, head].float().norm(dim=-1).topk(10, largest=False).indices.sort().values
        assert layer.pos[0, head][layer.valid[0, head]].tolist() == want.tolist()


def test_snapkv_on_the_model_keeps_its_observation_window(loaded) -> None:
    cache = _prefill(loaded, method("snapkv", n_keep=12, window_size=8))
    for layer in cache.layers:
        for head in range(layer.keys.shape[1]):
            kept = layer.pos[0, head][layer.valid[0, head]].tolist()
            assert len(kept) == 12 and set(range(P - 8, P)) <= set(kept)


@pytest.mark.parametrize("name", ["snapkv", "expected_attention"])
def test_adaptive_heads_share_the_layer_budget_and_keep_the_protected_tokens(loaded, name) -> None:
    """Ada-KV allocation: heads hold different counts, the layer total is the budget times the heads, and the
    tokens the method always keeps (the observation window, the sinks) stay in every head."""
    extra = {"window_size": 6} if name == "snapkv" else {"n_sink": 3}
    cache = _prefill(loaded, method(name, n_keep=12, head_allocation="adaptive", **extra))
    protected = set(range(P - 6, P)) if name == "snapkv" else {0, 1, 2}
    for layer in cache.layers:
        held = layer.valid[0].sum(dim=-1)
        assert int(held.sum()) == 12 * held.shape[0]
        for head in range(held.shape[0]):
            assert protected <= set(layer.pos[0, head][layer.valid[0, head]].tolist())
    assert any(len(set(layer.valid[0].sum(dim=-1).tolist())) > 1 for layer in cache.layers)  # really adaptive
