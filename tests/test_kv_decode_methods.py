"""Decode-time KV methods (h2o, tova, scissorhands): each idea on hand-built attention patterns
(``ScoreContext.synthetic``), then whole generations through the real runner on the tiny model, where every
eviction is checked against the method's rule recomputed here from the attention each step saw."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import pytest
import torch
from tokenbench.config import MeasureSettings
from tokenbench.errors import TokenbenchError
from tokenbench.families.kv import RAISED, KVMethod, ScoreContext
from tokenbench.lm import LMRunner, Prompt
from tokenbench.models.tiny import TinyLlama
from tokenbench.registry import METHODS, load_all

load_all()
H2O = METHODS.get("h2o", "kv").cls
TOVA = METHODS.get("tova", "kv").cls
Scissorhands = METHODS.get("scissorhands", "kv").cls


def keys_attracting(c: int, d: int, hot: dict[int, float]) -> torch.Tensor:
    """``(1, 1, c, d)`` keys: slot ``i`` along basis vector ``e_0`` with length ``hot[i]`` (0 elsewhere), so a
    query along ``e_0`` puts ``softmax(length * q)`` on each slot."""
    k = torch.zeros(1, 1, c, d)
    for i, v in hot.items():
        k[0, 0, i, 0] = v
    return k


def query_along(direction: torch.Tensor, hq: int, q: int, scale: float = 1.0) -> torch.Tensor:
    return (direction * scale).view(1, 1, 1, -1).expand(1, hq, q, -1).clone()


def top(scores: torch.Tensor, k: int, b: int = 0, h: int = 0) -> set[int]:
    return set(scores[b, h].topk(k).indices.tolist())


def decode_ctx(weights: torch.Tensor, hq: int = 2, shared: ScoreContext | None = None,
               budget: int | None = None) -> ScoreContext:
    """A decode-step context whose attention is ``weights`` (``(C,)``, the same for every query head), all
    ``C`` slots live at positions ``0..C-1``; ``shared``: continue that context's session state."""
    c = weights.shape[0]
    ctx = ScoreContext.synthetic(torch.zeros(1, hq, 1, 4), torch.zeros(1, 1, c, 4), phase="decode",
                                 attn_weights=weights.view(1, 1, 1, c).expand(1, hq, 1, c).contiguous(),
                                 budget=budget)
    if shared is not None:
        ctx.layer = shared.layer  # the same cache layer: its method state carries over
    return ctx


# --- h2o -------------------------------------------------------------------------------------------------


def test_h2o_keeps_heavy_hitters_and_the_recent_window() -> None:
    """Prefill: three heavy hitters draw most of every query's attention; a budget of 6 with half recent keeps
    them plus the 3 newest. Scores are the attention summed over all queries, mean over the GQA group."""
    c, d = 16, 4
    keys = keys_attracting(c, d, {2: 8.0, 5: 8.0, 9: 8.0})
    queries = query_along(torch.eye(d)[0], hq=2, q=c)
    queries[:, 1] *= 0.5  # the second query head of the group attends less sharply
    ctx = ScoreContext.synthetic(queries, keys, scaling=1.0, budget=6)
    scores = H2O(keep_ratio=0.5).score(ctx)
    assert top(scores, 6) == {2, 5, 9, 13, 14, 15}
    # outside the window: the sum over queries (causal) of the softmax, averaged over the two query heads
    logits = (queries[0, :, :, None, :] * keys[0, 0][None, None]).sum(-1)  # (Hq, q, C)
    causal = torch.ones(c, c, dtype=torch.bool).tril()
    ref = logits.masked_fill(~causal, float("-inf")).softmax(-1).sum(1).mean(0)
    torch.testing.assert_close(scores[0, 0, :13], ref[:13])
    # all budget to heavy hitters: the three, then the earliest tokens (seen by the most queries)
    no_window = H2O(keep_ratio=0.5, recent_ratio=0.0).score(ScoreContext.synthetic(queries, keys, scaling=1.0,
                                                                                   budget=6))
    assert top(no_window, 3) == {2, 5, 9} and top(no_window, 6) == {0, 1, 2, 3, 5, 9}


def test_h2o_window_is_its_share_of_each_rows_budget() -> None:
    """The window is floor(recent_ratio * budget) of each row's own budget, counted among the candidates only
    (slots 10, 11 stand for the question: not compared, not in the window)."""
    c = 12
    ctx = ScoreContext.synthetic(torch.zeros(2, 2, c, 4), torch.zeros(2, 1, c, 4),
                                 budget=torch.tensor([[8], [3]]))
    ctx.candidates = torch.ones(2, 1, c, dtype=torch.bool)
    ctx.candidates[:, :, 10:] = False
    scores = H2O(keep_ratio=0.5, recent_ratio=0.25).score(ctx)[:, :, :10]
    assert top(scores, 2, b=0) == {8, 9}  # floor(0.25 * 8) = 2 newest candidates
    assert top(scores, 2, b=1) == {0, 1}  # floor(0.25 * 3) = 0: uniform attention, the earliest sum most


def test_h2o_accumulates_attention_over_decode_steps() -> None:
    """Slot 3 got a large share once; slot 6 is the favourite of the last step only. H2O keeps the larger
    total (3), and the 3 newest slots are protected whatever their attention (budget 6, half recent)."""
    m = H2O(keep_ratio=0.5)
    w1 = torch.full((10,), 0.01)
    w1[3] = 0.91
    w2 = torch.full((10,), 0.05)
    w2[3], w2[6] = 0.0, 0.55
    ctx1 = decode_ctx(w1, budget=6)
    m.score(ctx1)
    s = m.score(decode_ctx(w2, shared=ctx1, budget=6))
    total = w1 + w2
    torch.testing.assert_close(s[0, 0, :7], total[:7])
    assert s[0, 0, 3] > s[0, 0, 6]
    assert set(s[0, 0].topk(3).indices.tolist()) == {7, 8, 9}  # the window, although they got little
    victim = int(s[0, 0].argmin())
    assert victim == int(total[:7].argmin())


# --- tova ------------------------------------------------------------------------------------------------


def test_tova_follows_the_last_query_not_earlier_ones() -> None:
    """The forward's last three tokens: the first two attend to slot 7, the last one to slot 3. TOVA ranks 3
    first (H2O, summing over all queries, ranks 7 first)."""
    c, d = 10, 4
    keys = keys_attracting(c, d, {7: 5.0})
    keys[0, 0, 3, 1] = 5.0
    queries = query_along(torch.eye(d)[0], hq=2, q=3)
    queries[:, :, -1] = torch.eye(d)[1]
    scores = TOVA(keep_ratio=0.5).score(ScoreContext.synthetic(queries, keys, scaling=1.0))
    assert int(scores[0, 0].argmax()) == 3
    ref = (queries[0, 0, -1] @ keys[0, 0].T).softmax(-1)
    torch.testing.assert_close(scores[0, 0], ref)
    h2o = H2O(keep_ratio=0.5, recent_ratio=0.0).score(ScoreContext.synthetic(queries, keys, scaling=1.0))
    assert int(h2o[0, 0].argmax()) == 7


def test_tova_averages_all_heads_so_every_kv_head_keeps_the_same_tokens() -> None:
    """Four query heads over two KV heads; each attends elsewhere. The score is the mean over all four, the
    same row for both KV heads."""
    c, d = 8, 4
    keys = torch.zeros(1, 2, c, d)
    keys[0, 0, 1, 0] = keys[0, 1, 5, 1] = 6.0
    queries = torch.zeros(1, 4, 1, d)
    queries[0, 0, 0, 0] = 1.0  # KV head 0's first query head -> slot 1
    queries[0, 3, 0, 1] = 1.0  # KV head 1's second query head -> slot 5
    ctx = ScoreContext.synthetic(queries, keys, scaling=1.0)
    scores = TOVA().score(ctx)
    assert torch.equal(scores[0, 0], scores[0, 1])
    assert top(scores, 2) == {1, 5}
    torch.testing.assert_close(scores[0, 0], ctx.attention(last=1)[0, :, -1].mean(0))


# --- scissorhands ------------------------------------------------------------------------------------------


def test_scissorhands_keeps_the_persistently_important_token() -> None:
    """Slot 1 is above the average share (1/8) at every step; slot 2 has one large spike, then stays below.
    Summed attention (H2O) prefers slot 2; Scissorhands keeps slot 1, which has no unimportant step."""
    m = Scissorhands(keep_ratio=0.5, history_window=4, recent_window=0)
    h2o = H2O(keep_ratio=0.5, recent_ratio=0)
    ctx = h_ctx = None
    for step in range(5):
        w = torch.full((8,), 0.0)
        w[1] = 0.15
        w[2] = 0.9 if step == 0 else 0.05
        w[w == 0] = (1 - w.sum()) / int((w == 0).sum())
        ctx = decode_ctx(w, shared=ctx)
        h_ctx = decode_ctx(w, shared=h_ctx)
        s, hs = m.score(ctx), h2o.score(h_ctx)
    assert hs[0, 0, 2] > hs[0, 0, 1]
    assert s[0, 0, 1] > s[0, 0, 2]
    count = ctx.state("scissorhands_count")[0, 0]
    assert count[1] == 0 and count[2] == 4  # the spike is out of the 4-step window


@pytest.mark.parametrize("window", [3, 62, 70, 130])
def test_scissorhands_counts_unimportant_steps_in_a_sliding_window(window: int) -> None:
    """Random importance patterns over 150 steps (crossing the 62-step words of the bit history): the score
    is ``position - count * (newest + 1)``, ``count`` = the unimportant steps among the last ``window``."""
    g = torch.Generator().manual_seed(window)
    c = 8
    m = Scissorhands(keep_ratio=0.5, history_window=window, recent_window=0)
    flags, ctx, scores = [], None, None
    for _ in range(150):
        important = torch.rand(c, generator=g) < 0.4
        one, other = torch.randperm(c, generator=g)[:2].tolist()
        important[one], important[other] = True, False  # at least one of each
        k = int(important.sum())
        w = torch.where(important, 0.5 / k + 0.5 / c, 0.5 / c)  # above / below the share 1/c, sums to 1
        flags.append(~important)
        ctx = decode_ctx(w, shared=ctx)
        scores = m.score(ctx)
    count = torch.stack(flags[-window:]).sum(0).double()
    ref = torch.arange(c).double() - count * c
    assert torch.equal(scores[0, 0], ref.float())


def test_scissorhands_protects_the_recent_window_and_breaks_ties_by_recency() -> None:
    w = torch.full((8,), 1 / 8)  # exactly the average: every slot is unimportant at every step
    m = Scissorhands(keep_ratio=0.5, history_window=4, recent_window=3)
    ctx = None
    for _ in range(2):
        ctx = decode_ctx(w, shared=ctx, budget=6)
        s = m.score(ctx)
    assert top(s, 3) == {5, 6, 7}
    assert s[0, 0, :5].argsort().tolist() == [0, 1, 2, 3, 4]  # equal counts: the older goes first
    two = Scissorhands(keep_ratio=0.5, recent_window=3).score(decode_ctx(w, budget=2))
    assert top(two, 2) == {6, 7}  # the window never exceeds the budget


@pytest.mark.parametrize("window", [5, 62, 70, 130])
def test_scissorhands_prefill_packs_the_history_like_step_by_step_updates(window: int) -> None:
    """The session's first (prefill) scoring packs the last min(w, q) queries' flags at once; it equals
    shifting them in one step at a time (the general path, taken here with ``step=1``)."""
    g = torch.Generator().manual_seed(window)
    c, d = 100, 8
    q, k = torch.randn(1, 4, c, d, generator=g), torch.randn(1, 2, c, d, generator=g)
    m = Scissorhands(keep_ratio=0.5, history_window=window, recent_window=3)
    packed, stepped = (ScoreContext.synthetic(q, k, budget=40, step=step) for step in (0, 1))
    assert torch.equal(m.score(packed), m.score(stepped))
    for name, t in packed.layer.state.items():
        assert torch.equal(t, stepped.layer.state[name]), name
    assert int(packed.state("scissorhands_count").max()) > 0


def test_keep_first_without_order_raises_the_mask_uniformly() -> None:
    ctx = ScoreContext.synthetic(torch.zeros(1, 2, 1, 4), torch.zeros(1, 2, 6, 4))
    scores = torch.tensor([[[0.5, -3.0, 2.0, 0.1, 0.2, 0.3], [1.0, 0.0, 0.0, 0.0, 9.0, 0.0]]])
    mask = torch.zeros(1, 2, 6, dtype=torch.bool)
    mask[:, :, 4:] = True
    out = ctx.keep_first(scores, mask)
    assert torch.equal(out[~mask], scores[~mask])
    assert bool((out[mask] == RAISED).all())  # one constant above every live score
    assert bool((out[mask] > scores[~mask].abs().max()).all())
    assert RAISED < 3e38  # below the Ada-KV floor's boost, so the floor still comes first


@pytest.mark.parametrize("kw", [{"recent_ratio": 1.5}, {"recent_ratio": -0.1}, {"recent_ratio": True}])
def test_h2o_bad_recent_ratio(kw) -> None:
    with pytest.raises(TokenbenchError, match="recent_ratio") as err:
        H2O(**kw)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("kw", [{"history_window": 0}, {"history_window": 2.5}, {"recent_window": -1}])
def test_scissorhands_bad_windows(kw) -> None:
    with pytest.raises(TokenbenchError, match=next(iter(kw))):
        Scissorhands(**kw)


def test_defaults() -> None:
    for cls in (H2O, TOVA, Scissorhands):
        assert cls.default_phase == "both" and set(cls.supported_phases) == {"prefill", "decode", "both"}
        assert cls(keep_ratio=0.5).resolved_phase == "both"
    assert H2O.supports_adaptive_heads and not TOVA.supports_adaptive_heads
    H2O(keep_ratio=0.5, head_allocation="adaptive")  # accepted


# --- whole generations through the runner: every eviction follows the rule ---------------------------------

P, S, STEPS = 40, 6, 12


@pytest.fixture(scope="module")
def loaded():
    return TinyLlama(num_hidden_layers=2).load()


@dataclass
class Call:
    """What one ``score`` call saw (batch row 0)."""

    layer: int
    phase: str
    live: list[dict[int, int]]  # per KV head: position -> slot, before this call's eviction
    att: torch.Tensor  # (Hq, w, C) attention of this forward's queries (decode: w = 1)
    qpos: list[int]
    budget: int


def spy(method: KVMethod) -> list[Call]:
    """Record every ``score`` call of ``method`` (its scores are not touched)."""
    calls: list[Call] = []
    score = method.score

    def recording(ctx: ScoreContext) -> torch.Tensor:
        att = ctx.attention()[0].clone()
        live = [{int(p): int(s) for s, p in enumerate(ctx.positions[0, h].tolist()) if ctx.valid[0, h, s]}
                for h in range(ctx.valid.shape[1])]
        calls.append(Call(ctx.layer_idx, ctx.phase, live, att, ctx.query_positions[0].tolist(),
                          int(ctx.budget[0, 0])))
        return score(ctx)

    method.score = recording  # an instance attribute: this method object only
    return calls


@dataclass
class Reference:
    """The method's rule recomputed from the recorded attention, for one layer and KV head."""

    name: str
    method: KVMethod
    head: int
    groups: int
    history: dict[int, list[tuple[int, bool]]] = field(default_factory=dict)  # scissorhands: (step, flag)
    total: dict[int, float] = field(default_factory=dict)  # h2o: accumulated attention
    last: dict[int, float] = field(default_factory=dict)  # tova: the newest query's attention
    clock: int = 0

    def observe(self, call: Call) -> None:
        live = call.live[self.head]
        for p in list(self.total) + list(self.history):
            if p not in live:  # evicted: its statistics go with it
                self.total.pop(p, None)
                self.history.pop(p, None)
        g = self.groups
        kv_att = call.att[self.head * g:(self.head + 1) * g].mean(0)  # (w, C)
        if self.name == "h2o":
            for p, s in live.items():
                self.total[p] = self.total.get(p, 0.0) + float(kv_att[:, s].sum())
        elif self.name == "tova":
            self.last = {p: float(call.att[:, -1, s].mean()) for p, s in live.items()}
        else:
            w = kv_att.shape[0]
            for j in range(w):
                qp = call.qpos[len(call.qpos) - w + j]
                seen = [p for p in live if p <= qp]
                self.clock += 1
                for p in seen:  # unimportant: at most the uniform share of what the query saw
                    flag = float(kv_att[j, live[p]]) * len(seen) <= 1
                    self.history.setdefault(p, []).append((self.clock, flag))

    def key(self, p: int) -> float:
        """Higher = keep."""
        if self.name == "h2o":
            return self.total.get(p, 0.0)
        if self.name == "tova":
            return self.last[p]
        hw = self.method.history_window
        count = sum(u for t, u in self.history.get(p, []) if t > self.clock - hw)
        return -1000.0 * count + p

    def window(self, budget: int) -> int:
        if self.name == "h2o":
            return math.floor(self.method.recent_ratio * budget + 1e-6)
        return 0 if self.name == "tova" else min(self.method.recent_window, budget)


def check_eviction(ref: Reference, candidates: set[int], kept: set[int], budget: int) -> None:
    """``kept`` = the newest ``window`` candidates + the best others by the rule (ties within float noise)."""
    assert len(kept & candidates) == min(budget, len(candidates))
    newest = max(candidates)
    recent = {p for p in candidates if p > newest - ref.window(budget)}
    assert recent <= kept, (recent, kept)
    evicted, others = candidates - kept, (candidates & kept) - recent
    if evicted and others:
        worst_kept = min(ref.key(p) for p in others)
        best_evicted = max(ref.key(p) for p in evicted)
        assert best_evicted <= worst_kept + 1e-5, (sorted(evicted), sorted(others))


METHOD_CASES = {
    "h2o": lambda **kw: H2O(n_keep=12, **kw),
    "tova": lambda **kw: TOVA(n_keep=12, **kw),
    "scissorhands": lambda **kw: Scissorhands(n_keep=12, history_window=5, recent_window=4, **kw),
}


@pytest.mark.parametrize("phase", ["both", "decode"])
@pytest.mark.parametrize("query_aware", [False, True])
@pytest.mark.parametrize("name", sorted(METHOD_CASES))
def test_generation_evicts_by_the_rule(loaded, name: str, query_aware: bool, phase: str) -> None:
    """Greedy generation on the tiny model (GQA, 2 layers): the cache holds its capacity (12 context + 6
    question tokens) at every decode step, and each eviction — the compressed prefill's and every step's —
    is the one the method's rule implies from the attention recorded at that step."""
    m = METHOD_CASES[name](query_aware=query_aware, phase=phase)
    calls = spy(m)
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(3, 390, (1, P + S), generator=g)
    runner = LMRunner(loaded, m, MeasureSettings(warmup=0))
    out = runner.generate(Prompt(ids[:, :P], ids[:, P:]), STEPS, STEPS)
    cap = m.budget(P) + S
    assert out.compression["decode_capacity"] == cap and out.cache_len_end == [cap, cap]
    cfg = loaded.model.config
    n_heads, groups = cfg.num_key_value_heads, cfg.num_attention_heads // cfg.num_key_value_heads
    for layer in range(cfg.num_hidden_layers):
        seq = [c for c in calls if c.layer == layer]
        decode = [c for c in seq if c.phase == "decode"]
        assert len(decode) == STEPS - 1
        assert [c.phase for c in seq].count("prefill") == (1 if phase == "both" else 0)
        refs = [Reference(name, m, h, groups) for h in range(n_heads)]
        victims = []
        for i, call in enumerate(seq):
            for ref in refs:
                ref.observe(call)
            nxt = next((c for c in seq[i + 1:] if c.phase == "decode"), None)
            if nxt is None:
                break
            if call.phase == "prefill":
                assert call.budget == m.budget(P)
                for h, ref in enumerate(refs):
                    context = {p for p in call.live[h] if p < P}
                    check_eviction(ref, context, {p for p in nxt.live[h] if p < P}, call.budget)
                continue
            assert call.budget == cap
            new = nxt.qpos[0]
            for h, ref in enumerate(refs):
                live, after = set(call.live[h]), set(nxt.live[h]) - {new}
                if i > 0 and seq[i - 1].phase == "decode":
                    assert len(live) == cap + 1  # steady state: one token over, one evicted
                assert len(after) == cap and after <= live
                check_eviction(ref, live, after, cap)
                victims.append((i, h, tuple(sorted(live - after))))
        if name == "tova":  # every KV head evicts the same tokens
            by_step: dict[int, set] = {}
            for i, h, v in victims:
                by_step.setdefault(i, set()).add(v)
            assert all(len(v) == 1 for v in by_step.values())


# --- the decode eviction step ----------------------------------------------------------------------------


@pytest.mark.parametrize("c", [12, 1024, 1031])
@pytest.mark.parametrize("seed", range(6))
def test_evict_lowest_frees_the_lowest_live_slot_and_returns_the_first_free(seed: int, c: int) -> None:
    """``evict_lowest`` against its rule spelled out slot by slot: a row/head over its cap loses its
    lowest-scoring live slot (validity cleared, position emptied), the others keep everything, and the next
    write slot is the first free one after the eviction. 1024 slots run the reductions in 4 chunks per row,
    1031 in 1 (does not divide); odd seeds tie scores (the first lowest slot goes, across chunks too)."""
    from tokenbench.families import kv as kv_family
    from tokenbench.families.kv import evict_lowest, first_free
    from tokenbench.kv_cache import _FAR

    assert kv_family._row_chunks(c) == {12: 1, 1024: 4, 1031: 1}[c]
    g = torch.Generator().manual_seed(seed)
    b, h = 3, 2
    valid = torch.rand(b, h, c, generator=g) < 0.8
    valid[0, 0] = True  # a full row: its next slot can only be the freed one
    pos = torch.where(valid, torch.randperm(b * h * c, generator=g).view(b, h, c), _FAR)
    scores = torch.randn(b, h, c, generator=g) if seed % 2 == 0 else \
        torch.randint(0, 3, (b, h, c), generator=g).float()
    cap = torch.randint(c // 2, c, (b, 1), generator=g)
    want_valid, want_pos = valid.clone(), pos.clone()
    for i in range(b):
        for j in range(h):
            if int(valid[i, j].sum()) > int(cap[i]):
                v = int(scores[i, j].masked_fill(~valid[i, j], float("inf")).argmin())
                want_valid[i, j, v], want_pos[i, j, v] = False, _FAR
    v2, p2 = valid.clone(), pos.clone()
    nxt = evict_lowest(scores, v2, p2, cap)
    assert torch.equal(v2, want_valid) and torch.equal(p2, want_pos)
    assert torch.equal(nxt, first_free(want_valid))
    assert int(nxt[0, 0]) == int(scores[0, 0].argmin())  # the full row writes where it evicted


@pytest.mark.parametrize("groups", [1, 4, 16])
def test_kv_heads_folds_the_same_compiled(groups: int) -> None:
    """``ScoreContext.kv_heads`` compiled (small GQA groups folded slice by slice, so inductor fuses the fold
    into its consumer) gives the eager mean and max."""
    ctx = ScoreContext.synthetic(torch.zeros(2, 2 * groups, 1, 4), torch.zeros(2, 2, 8, 4), phase="decode")
    x = torch.rand(2, 2 * groups, 1, 40, generator=torch.Generator().manual_seed(groups))
    for reduce in ("mean", "max"):
        torch._dynamo.reset()
        got = torch.compile(lambda t: ctx.kv_heads(t, reduce), fullgraph=True)(x)
        torch.testing.assert_close(got, ctx.kv_heads(x, reduce))
        assert got.shape == (2, 2, 1, 40)


def test_decode_evict_scores_the_written_slot_from_a_clean_state() -> None:
    """The slot a decode step wrote (reused after an eviction) starts at zero in the method's state before
    the method scores: h2o's sum there is this step's attention alone, every other slot keeps its history."""
    from tokenbench.families.kv import decode_evict

    c = 6
    w = torch.tensor([0.1, 0.2, 0.3, 0.1, 0.2, 0.1])
    ctx = decode_ctx(w, budget=6)
    total = ctx.state("h2o_attention")
    total += 5.0  # history, including stale sums at slot 2
    ctx.layer.slot = torch.tensor([[2]])  # this step's token went to slot 2
    decode_evict(H2O(keep_ratio=0.5, recent_ratio=0.0), ctx, torch.tensor([[c]]))
    want = torch.full((c,), 5.0) + w
    want[2] = w[2]
    torch.testing.assert_close(ctx.state("h2o_attention")[0, 0], want)


def test_newest_at_a_decode_step_is_the_steps_own_token() -> None:
    """At a decode step ``ScoreContext.newest`` takes the step's query position (its token is written before
    scoring) instead of reducing over the slots; it equals that reduction."""
    c = 9
    pos = torch.tensor([3, 0, 7, 1, 5, 2, 8, 4, 6]).view(1, 1, c).expand(2, 2, c).clone()
    valid = torch.ones(2, 2, c, dtype=torch.bool)
    valid[1, :, 6] = False  # row 1's position 8 was evicted; its query is at 9, just written
    pos[1, :, 1] = 9
    ctx = ScoreContext.synthetic(torch.zeros(2, 4, 1, 4), torch.zeros(2, 2, c, 4), positions=pos, valid=valid,
                                 query_positions=torch.tensor([[8], [9]]), phase="decode")
    reduced = pos.masked_fill(~valid, -1).amax(dim=-1, keepdim=True)
    assert torch.equal(ctx.newest(), reduced)
