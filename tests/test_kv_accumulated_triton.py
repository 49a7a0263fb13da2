"""The Triton accumulated attention of a prefill (tokenbench.kv_accumulated_triton) against the eager chunked
path of ``ScoreContext.accumulated_attention``: holes and gaps in the earlier cache, left padding, GQA groups.
In Triton's interpreter on CPU (float32 / float16), and on a GPU in bfloat16."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from tokenbench import kv_accumulated_triton, kv_attention  # noqa: E402 (after the importorskip)
from tokenbench.families.kv import ScoreContext  # noqa: E402
from tokenbench.kv_cache import _FAR  # noqa: E402

CPU_ONLY = pytest.mark.skipif(torch.cuda.is_available(), reason="the interpreter runs without a GPU only")


def context(b: int, h: int, g: int, d: int, prev: int, q: int, pad: int, dtype: torch.dtype, device: str = "cpu",
            seed: int = 0) -> ScoreContext:
    """``prev`` slots from an earlier (compressed) forward — positions with gaps, a quarter evicted — then this
    forward's ``q`` tokens; row 1 left-padded by ``pad`` queries (invalid slots, clamped positions)."""
    gen = torch.Generator().manual_seed(seed)
    c = prev + q
    queries = torch.randn(b, h * g, q, d, generator=gen).to(dtype=dtype, device=device)
    keys = torch.randn(b, h, c, d, generator=gen).to(dtype=dtype, device=device)
    kept = torch.randperm(3 * prev, generator=gen)[:prev].sort().values  # the earlier tokens' positions
    positions = torch.empty(b, h, c, dtype=torch.long)
    positions[..., :prev] = kept
    valid = torch.ones(b, h, c, dtype=torch.bool)
    valid[..., :prev] = torch.rand(b, h, prev, generator=gen) > 0.25
    positions[..., :prev] = torch.where(valid[..., :prev], positions[..., :prev], _FAR)
    qpos = (3 * prev + torch.arange(q)).expand(b, q).clone()
    qvalid = torch.ones(b, q, dtype=torch.bool)
    if b > 1 and pad:
        qvalid[1, :pad] = False
        qpos[1] = torch.cat([torch.zeros(pad, dtype=torch.long), 3 * prev + torch.arange(q - pad)])
    positions[..., prev:] = qpos.view(b, 1, q)
    valid[..., prev:] = qvalid.view(b, 1, q)
    ctx = ScoreContext.synthetic(queries, keys, positions=positions.to(device), valid=valid.to(device),
                                 query_positions=qpos.to(device), scaling=d ** -0.5)
    ctx.query_valid = qvalid.to(device)
    return ctx


def both(ctx: ScoreContext, monkeypatch) -> tuple[torch.Tensor, torch.Tensor]:
    monkeypatch.setattr(kv_attention, "ACCUMULATED_BACKEND", "eager")
    ref = ctx.accumulated_attention(chunk=17)  # several chunks, one not full
    monkeypatch.setattr(kv_attention, "ACCUMULATED_BACKEND", "triton")
    return ctx.accumulated_attention(), ref


@CPU_ONLY
@pytest.mark.parametrize("g,prev,q,pad", [(1, 0, 70, 0), (3, 37, 150, 9), (4, 64, 64, 63), (2, 5, 1, 0)])
def test_matches_the_eager_chunks(monkeypatch, g: int, prev: int, q: int, pad: int) -> None:
    ctx = context(2, 2, g, 16, prev, q, pad, torch.float32)
    assert kv_accumulated_triton.supported(ctx.queries, ctx.keys)
    got, ref = both(ctx, monkeypatch)
    assert got.shape == ref.shape == (2, 2 * g, prev + q)
    torch.testing.assert_close(got, ref, atol=2e-5, rtol=1e-5)
    # every valid query hands out a whole unit of weight; padding queries and evicted slots get/give none
    torch.testing.assert_close(got.sum(-1), ctx.query_valid.sum(-1, keepdim=True).float().expand(2, 2 * g))
    assert not got.masked_select(~ctx.valid.repeat_interleave(g, dim=1)).any()


@CPU_ONLY
def test_half_precision_inputs(monkeypatch) -> None:
    """float16 queries/keys: float32 scores in the kernel, the eager path rounds scores to float16 first."""
    ctx = context(2, 2, 2, 32, 20, 90, 5, torch.float16)
    got, ref = both(ctx, monkeypatch)
    torch.testing.assert_close(got, ref, atol=5e-3, rtol=5e-3)


def test_unsupported_inputs_take_the_eager_path(monkeypatch) -> None:
    """A head dim that is not a power of two (or bfloat16 in the interpreter): the eager chunks, same result."""
    ctx = context(1, 2, 2, 12, 10, 20, 0, torch.float32)
    assert not kv_accumulated_triton.supported(ctx.queries, ctx.keys)
    got, ref = both(ctx, monkeypatch)
    torch.testing.assert_close(got, ref)
    with pytest.raises(ValueError, match="unsupported"):
        kv_accumulated_triton.accumulated_attention(ctx.queries, ctx.keys, ctx.valid, ctx.positions,
                                                    ctx.query_positions, ctx.query_valid, ctx.scaling)


@pytest.mark.gpu
def test_bfloat16_on_the_gpu(monkeypatch) -> None:
    ctx = context(2, 8, 4, 128, 300, 1000, 17, torch.bfloat16, device="cuda")
    got, ref = both(ctx, monkeypatch)
    torch.testing.assert_close(got, ref, atol=2e-2, rtol=2e-2)


def test_auto_takes_the_kernel_on_a_gpu_only(monkeypatch) -> None:
    """``ACCUMULATED_BACKEND="auto"`` (the default): the Triton kernel for CUDA tensors, the eager chunks on the
    CPU (the interpreter is far slower there); an explicit choice wins on either."""
    assert kv_attention.ACCUMULATED_BACKEND == "auto"
    assert kv_attention.accumulated_backend("cuda:0") == "triton"
    assert kv_attention.accumulated_backend(torch.device("cpu")) == "eager"
    for choice in ("eager", "triton"):
        monkeypatch.setattr(kv_attention, "ACCUMULATED_BACKEND", choice)
        assert kv_attention.accumulated_backend("cuda") == kv_attention.accumulated_backend("cpu") == choice
    monkeypatch.setattr(kv_attention, "ACCUMULATED_BACKEND", "auto")
    calls = []
    monkeypatch.setattr(kv_accumulated_triton, "accumulated_attention", lambda *a: calls.append(a))
    ctx = context(1, 2, 2, 16, 3, 20, 0, torch.float32)
    ref = ctx.accumulated_attention()
    assert not calls and ref.shape == (1, 4, 23)  # CPU: the eager chunks ran
