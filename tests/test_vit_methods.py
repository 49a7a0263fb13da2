"""ViT family: every registered vit method is checked automatically (no-op at keep-all, token counts per
block as scheduled, batch rows independent, prefix tokens kept first, sizes and sources consistent), and
ToMe, PiToMe and EViT are compared with slow, straightforward reference implementations written here from
the papers (and the reference code's ordering conventions): same merge decisions (source maps), same
logits, on random inputs."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F
from tokenbench.errors import IncompatibleError, TokenbenchError
from tokenbench.families.vit import VisionTokenReducer, VitSession, input_tokens
from tokenbench.models.timm_vit import TinyViT
from tokenbench.registry import METHODS, check_compatible, load_all
from tokenbench.vision import count_flops

load_all()

VIT_METHODS = METHODS.family("vit")
IDS = [c.registered_name for c in VIT_METHODS]
BUDGETED = [c for c in VIT_METHODS if c.takes_budget]
BUDGET_IDS = [c.registered_name for c in BUDGETED]


def tiny(**kw) -> torch.nn.Module:
    spec = {"img_size": 64, "patch_size": 8, "depth": 4, "embed_dim": 64, "num_heads": 4, **kw}
    return TinyViT(**spec).load().model


@pytest.fixture(scope="module")
def vit():
    return tiny()


@pytest.fixture(scope="module")
def vit64():
    """float64 models for the reference comparisons: rounding cannot flip a merge decision."""
    return {
        "cls": tiny().double(),
        "avg": tiny(class_token=False, global_pool="avg").double(),
        "distilled": tiny(distilled=True).double(),
    }


def images(n: int = 2, seed: int = 0, size: int = 64, dtype=torch.float32) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def run(model, method: VisionTokenReducer, x: torch.Tensor, force: bool = False):
    """Logits and the session; ``force`` patches the model even when the method is a no-op."""
    with torch.inference_mode():
        if force:
            session = VitSession(method, model)
            session.install()
            try:
                return model(x), session
            finally:
                session.remove()
        with method.attach(model) as session:
            return model(x), session


def init_fields(cls: type) -> set[str]:
    return {f.name for f in dataclasses.fields(cls) if f.init}


# --- every registered vit method ------------------------------------------------------------------------


def test_builtin_vit_methods_registered() -> None:
    assert {"none", "random", "tome", "pitome", "evit"} <= set(IDS)


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("cls", VIT_METHODS, ids=IDS)
def test_noop_at_keep_all_gives_the_unpatched_logits(vit, cls, fused) -> None:
    """Default parameters keep every token: attached (nothing patched) or forced through the patched block
    loop (fused or explicit attention), the logits are exactly the unpatched model's."""
    for m in vit.modules():
        if hasattr(m, "fused_attn"):
            m.fused_attn = fused
    try:
        x = images(3)
        with torch.inference_mode():
            ref = vit(x)
        method = cls()
        assert method.is_noop()
        out, session = run(vit, method, x)
        assert torch.equal(out, ref)
        assert not session.installed and "forward" not in vars(vit.blocks)
        forced, fsession = run(vit, method, x, force=True)
        assert torch.equal(forced, ref)
        assert fsession.stats()["tokens_per_layer"] == [65] * 4
        assert fsession.stats()["achieved_keep_ratio"] == 1.0
    finally:
        for m in vit.modules():
            if hasattr(m, "fused_attn"):
                m.fused_attn = True


@pytest.mark.parametrize(
    ("r", "inflection", "expected"),
    [
        (2, 0.0, [63, 61, 59, 57]),  # constant r
        (4, -1.0, [57, 52, 50, 50]),  # ToMe's decreasing schedule: r per block 8, 5, 2, 0
        (3, 1.0, [65, 63, 59, 53]),  # increasing: 0, 2, 4, 6
    ],
)
@pytest.mark.parametrize("cls", BUDGETED, ids=BUDGET_IDS)
def test_tokens_per_block_follow_the_schedule(vit, cls, r, inflection, expected) -> None:
    """65 input tokens (64 patches + class token), 4 blocks; no per-block cap binds at these r."""
    method = cls(r=r, inflection=inflection)
    assert not method.is_noop()
    out, session = run(vit, method, images(2))
    stats = session.stats()
    assert stats["tokens_per_layer"] == expected
    assert stats["tokens_in_per_layer"] == [65] + expected[:-1]
    assert stats["achieved_keep_ratio"] == pytest.approx(
        sum((a + b) / 130 for a, b in zip([65] + expected[:-1], expected)) / 4
    )
    assert out.shape == (2, 10) and torch.isfinite(out).all()
    assert method.nominal_budget()["r"] == r


@pytest.mark.parametrize("cls", BUDGETED, ids=BUDGET_IDS)
def test_prefix_tokens_stay_first_and_sources_partition_the_patches(cls) -> None:
    """Class and distillation tokens are never merged or dropped and stay in front; every final token holds a
    disjoint set of input tokens; its size is how many it holds."""
    model = tiny(distilled=True)
    method = cls(r=6, trace_source=True)
    _, session = run(model, method, images(2))
    src = session.source  # (B, N_final, N_input)
    assert src.shape == (2, session.stats()["final_tokens"], 66)
    assert torch.equal(src[:, 0], F.one_hot(torch.tensor(0), 66).float().expand(2, -1))
    assert torch.equal(src[:, 1], F.one_hot(torch.tensor(1), 66).float().expand(2, -1))
    assert bool((src.sum(dim=1) <= 1).all())  # no input token in two final tokens
    assert torch.equal(session.size[..., 0], src.sum(dim=-1))
    groups = session.patch_groups()
    held = src.sum(dim=1) > 0
    assert torch.equal(src.gather(1, groups[:, None, :])[:, 0][held], torch.ones(int(held.sum())))


@pytest.mark.parametrize(
    "cls",
    [c for c in BUDGETED if c.batch_consistent],
    ids=[c.registered_name for c in BUDGETED if c.batch_consistent],
)
def test_batch_row_equals_image_alone(vit, cls) -> None:
    method = cls(r=5)
    x = images(3, seed=4)
    both, _ = run(vit, method, x)
    for i in range(3):
        alone, _ = run(vit, method, x[i : i + 1])
        torch.testing.assert_close(both[i], alone[0], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("cls", BUDGETED, ids=BUDGET_IDS)
def test_merge_decisions_use_the_images(vit, cls) -> None:
    """Different images give different decisions (except where the method ignores them, i.e. random), and the
    reduced model still differs from the full one."""
    method = cls(r=8, trace_source=True)
    x = images(2, seed=9)
    out, session = run(vit, method, x)
    with torch.inference_mode():
        full = vit(x)
    assert not torch.allclose(out, full)
    assert not torch.equal(session.source[0], session.source[1])


def test_random_is_reproducible_and_seeded(vit) -> None:
    cls = METHODS.get("random", "vit").cls
    x = images(2, seed=5)
    a = run(vit, cls(r=8, seed=0, trace_source=True), x)[1].source
    b = run(vit, cls(r=8, seed=0, trace_source=True), x)[1].source
    c = run(vit, cls(r=8, seed=1, trace_source=True), x)[1].source
    assert torch.equal(a, b) and not torch.equal(a, c)
    # random drops, never merges: each final token is one input token, in increasing position
    assert bool((a.sum(dim=-1) == 1).all())
    pos = a.argmax(dim=-1)
    assert bool((pos[:, 1:] > pos[:, :-1]).all())


@pytest.mark.parametrize("cls", BUDGETED, ids=BUDGET_IDS)
def test_bad_budget_raises_one_line(cls) -> None:
    for kw in ({"r": -1}, {"inflection": 2.0}):
        with pytest.raises(TokenbenchError) as err:
            cls(**kw)
        assert list(kw)[0] in str(err.value) and "\n" not in str(err.value)


def test_method_specific_validation() -> None:
    with pytest.raises(TokenbenchError, match="takes no budget"):
        METHODS.get("none", "vit").cls(r=4)
    with pytest.raises(TokenbenchError, match="ratio"):
        METHODS.get("pitome").cls(ratio=1.5)
    with pytest.raises(TokenbenchError, match="keep_rate"):
        METHODS.get("evit").cls(keep_rate=0.0)
    with pytest.raises(TokenbenchError, match="either r"):
        METHODS.get("evit").cls(r=4, keep_rate=0.7)


def test_flops_fall_with_the_tokens(vit) -> None:
    x = images(1)
    full = count_flops(vit, x)
    with METHODS.get("tome").cls(r=8).attach(vit):
        merged = count_flops(vit, x)
    # 4 blocks x (qkv + proj + MLP) at 65 tokens dominate; merging 8 per block removes about a quarter
    assert 0.6 * full < merged < 0.85 * full
    per_block = 2 * 65 * 64 * (3 * 64 + 64 + 2 * 4 * 64)  # linear layers, 2 FLOPs per multiply-add
    assert full > 4 * per_block


# --- unpatchable models, wrong pairs ------------------------------------------------------------------


def test_unpatchable_models_fail_clearly() -> None:
    from timm.models.vision_transformer import ResPostBlock, VisionTransformer

    tome = METHODS.get("tome").cls(r=2)
    with pytest.raises(TokenbenchError, match="VisionTransformer"):
        with tome.attach(torch.nn.Sequential(torch.nn.Linear(4, 4))):
            pass
    post = VisionTransformer(
        img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, block_fn=ResPostBlock
    )
    with pytest.raises(TokenbenchError, match="ResPostBlock"):
        with tome.attach(post):
            pass
    with pytest.raises(IncompatibleError, match="tome"):
        check_compatible("tome", "tiny-llama", "niah")
    with pytest.raises(IncompatibleError, match="streaming_llm"):
        check_compatible("streaming_llm", "tiny-vit", "imagenet")
    assert check_compatible("random", "tiny-vit", "imagenet") == "vit"


def test_evit_needs_a_class_token() -> None:
    model = tiny(class_token=False, global_pool="avg")
    with pytest.raises(TokenbenchError, match="class token"):
        run(model, METHODS.get("evit").cls(r=2), images(1))


def test_detach_restores_the_model(vit) -> None:
    x = images(2)
    with torch.inference_mode():
        ref = vit(x)
    with METHODS.get("tome").cls(r=8).attach(vit):
        with pytest.raises(TokenbenchError, match="already"):
            with METHODS.get("pitome").cls(r=8).attach(vit):
                pass
    assert "forward" not in vars(vit.blocks)
    with torch.inference_mode():
        assert torch.equal(vit(x), ref)


# --- slow reference implementations ------------------------------------------------------------------
#
# Written from the papers, one image at a time with Python lists; the order of the output tokens follows the
# reference code (it decides the next block's bipartite split). A "slot" is a list of (input token, weight)
# members; weight None means the size-weighted mean (ToMe's merge_wavg), a number means EViT's weighted sum.


def ref_attention(blk, x, size, prop_attn: bool):
    """Explicit attention of one timm block: x after the attention residual, the mean keys, the map."""
    attn = blk.attn
    h = blk.norm1(x)
    b, n, c = h.shape
    qkv = attn.qkv(h).reshape(b, n, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
    q, k, v = qkv[0], qkv[1], qkv[2]
    logits = (q @ k.transpose(-2, -1)) * attn.scale
    if prop_attn:
        logits = logits + size.log()[:, None, None, :]
    probs = logits.softmax(dim=-1)
    return x + attn.proj((probs @ v).transpose(1, 2).reshape(b, n, c)), k.mean(dim=1), probs


def ref_forward(model, x_img, step, prop_attn: bool = False):
    """A whole forward with ``step(layer, row, metric, probs) -> slots or None`` between attention and MLP.
    Returns the logits and, per image, the groups of input tokens of the final tokens (in order)."""
    x = model.norm_pre(model._pos_embed(model.patch_embed(x_img)))
    b, n0, _ = x.shape
    size = torch.ones(b, n0, dtype=x.dtype)
    groups = [[[i] for i in range(n0)] for _ in range(b)]
    merged_once = False
    for layer, blk in enumerate(model.blocks):
        x, metric, probs = ref_attention(blk, x, size, prop_attn and merged_once)
        plans = [step(layer, i, metric[i], probs[i]) for i in range(b)]
        if plans[0] is not None:
            merged_once = True
            new_x, new_size = [], []
            for i, slots in enumerate(plans):
                xs, ss, gs = [], [], []
                for slot in slots:
                    members = [t for t, _ in slot]
                    s = sum(size[i, t] for t in members)
                    if slot[0][1] is None:
                        xs.append(sum(size[i, t] * x[i, t] for t in members) / s)
                    else:
                        xs.append(sum(w * x[i, t] for t, w in slot))
                    ss.append(s)
                    gs.append(sorted(g for t in members for g in groups[i][t]))
                new_x.append(torch.stack(xs))
                new_size.append(torch.stack(ss))
                groups[i] = gs
            x, size = torch.stack(new_x), torch.stack(new_size)
        x = x + blk.mlp(blk.norm2(x))
    return model.forward_head(model.norm(x)), groups


def groups_of(session) -> list[list[list[int]]]:
    src = session.source
    return [
        [torch.nonzero(src[i, j]).flatten().tolist() for j in range(src.shape[1])]
        for i in range(src.shape[0])
    ]


def schedule(r: int, inflection: float, depth: int) -> list[int]:
    lo = int(r * (1 - inflection))
    step = (2 * r - 2 * lo) / (depth - 1)
    return [int(lo + step * i) for i in range(depth)]


def tome_reference(r: int, n_prefix: int, inflection: float = 0.0, depth: int = 4):
    """ToMe: alternate tokens into A (even) and B (odd); protected tokens never merge; each A token points to
    its most similar B token; the r best-matched A tokens merge into their partners."""
    rs = schedule(r, inflection, depth)

    def step(layer, row, metric, probs):
        n = metric.shape[0]
        rr = min(rs[layer], (n - n_prefix) // 2)
        if rr <= 0:
            return None
        m = metric / metric.norm(dim=-1, keepdim=True)
        a_set, b_set = list(range(0, n, 2)), list(range(1, n, 2))
        best = {}
        for i in a_set:
            if i < n_prefix:
                continue
            sims = [(float(m[i] @ m[j]), j) for j in b_set if j >= n_prefix]
            best[i] = max(sims)
        ranked = sorted(best, key=lambda i: -best[i][0])
        merged = ranked[:rr]
        unmerged = sorted(ranked[rr:]) if n_prefix else ranked[rr:]
        slots = [[(t, None)] for t in range(n_prefix)]
        slots += [[(t, None)] for t in unmerged]
        for j in b_set:
            if j >= n_prefix:
                slots.append([(j, None)] + [(i, None) for i in merged if best[i][1] == j])
        return slots

    return step


def pitome_reference(r: int, n_prefix: int, margin: float = 0.75, depth: int = 4, ratio=None):
    """PiToMe: energy E_i = mean_j elu(cos_ij - margin_l); tokens sorted by energy. Early blocks: bipartite
    matching on sets alternating in that order; later blocks: the 2r highest-energy tokens alternate into A
    and B, every A token merges into its most similar B token, the others are kept."""

    def step(layer, row, metric, probs):
        n = metric.shape[0]
        t = n - n_prefix
        rr = math.floor(t - t * ratio) if ratio is not None else r
        rr = min(rr, t // 2)
        if rr <= 0:
            return None
        m = F.normalize(metric[n_prefix:], dim=-1)
        sim = m @ m.T
        energy = F.elu(sim - margin * (1 - layer / depth)).mean(dim=-1)
        order = sorted(range(t), key=lambda i: -float(energy[i]))
        slots = [[(p, None)] for p in range(n_prefix)]
        if layer < math.ceil(depth / 2):
            a_set, b_set = order[0::2], order[1::2]
            best = {i: max((float(sim[i, j]), j) for j in b_set) for i in a_set}
            ranked = sorted(a_set, key=lambda i: -best[i][0])
            merged, keep = ranked[:rr], ranked[rr:]
        else:
            a_set, b_set = order[0 : 2 * rr : 2], order[1 : 2 * rr : 2]
            best = {i: max((float(sim[i, j]), j) for j in b_set) for i in a_set}
            merged, keep = a_set, order[2 * rr :]
        slots += [[(n_prefix + i, None)] for i in keep]
        for j in b_set:
            slots.append([(n_prefix + j, None)] + [(n_prefix + i, None) for i in merged if best[i][1] == j])
        return slots

    return step


def evit_reference(keep, n_prefix: int = 1, fuse: bool = True):
    """EViT: attentiveness = the class token's attention (mean over heads); keep the most attentive tokens in
    descending order; fuse the others into one token, sum of attentiveness x token. ``keep(layer, T)`` gives
    the number kept (None: block not reduced)."""

    def step(layer, row, metric, probs):
        n = probs.shape[-1]
        left = keep(layer, n - n_prefix)
        if left is None:
            return None
        attn = probs[:, 0, :].mean(dim=0)
        order = sorted(range(n_prefix, n), key=lambda i: -float(attn[i]))
        slots = [[(p, None)] for p in range(n_prefix)] + [[(i, None)] for i in order[:left]]
        if fuse:
            slots.append([(i, float(attn[i])) for i in order[left:]])
        return slots

    return step


def compare(model, method, step, x, prop_attn=False):
    out, session = run(model, method, x)
    with torch.inference_mode():
        ref, ref_groups = ref_forward(model, x, step, prop_attn)
    assert groups_of(session) == ref_groups  # same merge decisions, same output order
    torch.testing.assert_close(out, ref, atol=1e-9, rtol=1e-9)
    return session


@pytest.mark.parametrize("prop_attn", [True, False])
@pytest.mark.parametrize("r", [1, 3, 8, 40])  # 40: capped at half of the unprotected tokens
@pytest.mark.parametrize("kind", ["cls", "avg", "distilled"])
def test_tome_matches_reference(vit64, kind, r, prop_attn) -> None:
    model = vit64[kind]
    n_prefix = {"cls": 1, "avg": 0, "distilled": 2}[kind]
    method = METHODS.get("tome").cls(r=r, prop_attn=prop_attn, trace_source=True)
    x = images(2, seed=r, dtype=torch.float64)
    session = compare(model, method, tome_reference(r, n_prefix), x, prop_attn)
    assert session.stats()["tokens_in_per_layer"][0] == input_tokens(model)


@pytest.mark.parametrize("inflection", [-1.0, 0.5])
def test_tome_schedule_matches_reference(vit64, inflection) -> None:
    method = METHODS.get("tome").cls(r=6, inflection=inflection, trace_source=True)
    compare(
        vit64["cls"], method, tome_reference(6, 1, inflection), images(2, seed=7, dtype=torch.float64), True
    )


@pytest.mark.parametrize("kind", ["cls", "distilled"])
def test_proportional_attention_as_a_key_channel_matches_reference(vit64, kind, monkeypatch) -> None:
    """The CUDA default (log size as one more key channel, heads padded) computes the same attention as the
    additive bias: same decisions and logits as the reference, on a CPU in float64."""
    from tokenbench.families import vit as family

    monkeypatch.setattr(family, "PROP_ATTN", "channel")
    method = METHODS.get("tome").cls(r=7, trace_source=True)
    n_prefix = {"cls": 1, "distilled": 2}[kind]
    compare(vit64[kind], method, tome_reference(7, n_prefix), images(2, seed=8, dtype=torch.float64), True)
    assert any(
        k[0] == "padded_qkv" for k in run(vit64[kind], method, images(1, dtype=torch.float64))[1]._constants
    )


def test_tome_explicit_attention_path_matches_reference() -> None:
    model = tiny().double()
    for m in model.modules():
        if hasattr(m, "fused_attn"):
            m.fused_attn = False
    method = METHODS.get("tome").cls(r=5, trace_source=True)
    compare(model, method, tome_reference(5, 1), images(2, seed=3, dtype=torch.float64), True)


@pytest.mark.parametrize(("r", "ratio"), [(3, None), (9, None), (40, None), (0, 0.85)])
@pytest.mark.parametrize("kind", ["cls", "avg"])
def test_pitome_matches_reference(vit64, kind, r, ratio) -> None:
    n_prefix = {"cls": 1, "avg": 0}[kind]
    method = METHODS.get("pitome").cls(r=r, ratio=ratio, trace_source=True)
    assert method.bsm_layers == 0.5 and method.margin == 0.75
    compare(
        vit64[kind],
        method,
        pitome_reference(r, n_prefix, ratio=ratio),
        images(2, seed=11 + r, dtype=torch.float64),
    )


def test_pitome_protects_distillation_token(vit64) -> None:
    """The reference only knows a class token; here the distillation token is protected as well."""
    method = METHODS.get("pitome").cls(r=5, trace_source=True)
    compare(vit64["distilled"], method, pitome_reference(5, 2), images(2, seed=2, dtype=torch.float64))


@pytest.mark.parametrize("fuse", [True, False])
def test_evit_keep_rate_matches_reference(vit64, fuse) -> None:
    method = METHODS.get("evit").cls(keep_rate=0.7, drop_loc=[1, 3], fuse_token=fuse, trace_source=True)
    keep = lambda layer, t: math.ceil(0.7 * t) if layer in (1, 3) else None  # noqa: E731
    session = compare(
        vit64["cls"], method, evit_reference(keep, fuse=fuse), images(2, seed=5, dtype=torch.float64)
    )
    t1 = math.ceil(0.7 * 64)
    assert session.stats()["tokens_per_layer"] == [
        65,
        1 + t1 + fuse,
        1 + t1 + fuse,
        1 + math.ceil(0.7 * (t1 + fuse)) + fuse,
    ]


@pytest.mark.parametrize("r", [2, 9])
def test_evit_at_tome_token_counts_matches_reference(vit64, r) -> None:
    method = METHODS.get("evit").cls(r=r, trace_source=True)
    keep = lambda layer, t: t - r - 1  # noqa: E731  (the fused token makes up the difference)
    session = compare(vit64["cls"], method, evit_reference(keep), images(2, seed=r, dtype=torch.float64))
    assert session.stats()["tokens_per_layer"] == [65 - r * (i + 1) for i in range(4)]
