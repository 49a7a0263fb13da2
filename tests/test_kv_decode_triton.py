"""The split-KV Triton decode attention (``tokenbench.kv_decode_triton``) against the explicit GQA-packed path
(``kv_attention.decode_attention``): outputs and attention weights, over GQA groups, slot counts that are not a
multiple of the block, strided cache views, masked slots, rows with nothing live, and every split count.
Without a GPU the kernels run in Triton's interpreter (``TRITON_INTERPRET=1``, set by conftest); the bfloat16
cases need a GPU (the interpreter has no bfloat16 arithmetic)."""

from __future__ import annotations

import os

import pytest
import torch

triton = pytest.importorskip("triton")

from tokenbench import kv_attention, kv_decode_triton  # noqa: E402


def case(b: int, hq: int, h: int, c: int, d: int, dtype: torch.dtype, device: str, seed: int = 0,
         live: float = 0.7):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, hq, 1, d, generator=g).to(device, dtype)
    # views into wider buffers, as the cache hands them over (capacity > the attended slots)
    kbuf = torch.randn(b, h, c + 9, d, generator=g).to(device, dtype)
    vbuf = torch.randn(b, h, c + 9, d, generator=g).to(device, dtype)
    valid = (torch.rand(b, h, c, generator=g) < live).to(device)
    valid[..., -1] = True  # the slot just written is always live
    return q, kbuf[:, :, :c], vbuf[:, :, :c], valid


SHAPES = [  # (batch, query heads, kv heads, slots, head dim)
    (2, 8, 2, 100, 16),  # GQA 4, slots not a multiple of the block
    (3, 7, 7, 64, 32),  # multi-head, exactly one block
    (1, 4, 1, 200, 64),  # one KV head
    (2, 12, 4, 131, 16),  # group of 3 (padded to the kernel's 16 query rows)
]


# CPU tensors need Triton's interpreter, which conftest switches on only where there is no GPU
CPU_NEEDS_INTERPRETER = pytest.mark.skipif(torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1",
                                           reason="CPU tensors need TRITON_INTERPRET=1 (off where a GPU is)")


def devices() -> list:
    return [pytest.param("cpu", marks=CPU_NEEDS_INTERPRETER), pytest.param("cuda", marks=pytest.mark.gpu)]


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("splits", [1, 2, None])
def test_matches_explicit_decode_attention(shape, splits, device) -> None:
    dtype = torch.float32
    q, k, v, valid = case(*shape, dtype=dtype, device=device)
    ref_out, ref_w = kv_attention.decode_attention(q, k, v, valid, 0.3)
    out, w = kv_decode_triton.decode_attention(q, k, v, valid, 0.3, want_weights=True, splits=splits)
    assert out.shape == ref_out.shape and out.dtype == ref_out.dtype
    torch.testing.assert_close(out, ref_out, atol=2e-5, rtol=2e-5)
    assert w.shape == ref_w.shape and w.dtype == torch.float32
    torch.testing.assert_close(w, ref_w, atol=1e-6, rtol=1e-5)
    assert torch.all(w[~valid.repeat_interleave(shape[1] // shape[2], dim=1).unsqueeze(2)] == 0)
    no_w, none = kv_decode_triton.decode_attention(q, k, v, valid, 0.3, splits=splits)
    assert none is None
    torch.testing.assert_close(no_w, out, atol=0, rtol=0)


@pytest.mark.parametrize("dtype,device", [pytest.param(torch.float16, "cpu", marks=CPU_NEEDS_INTERPRETER),
                                          pytest.param(torch.bfloat16, "cuda", marks=pytest.mark.gpu),
                                          pytest.param(torch.float16, "cuda", marks=pytest.mark.gpu)])
def test_half_precision(dtype, device) -> None:
    """fp16/bf16 caches: float32 accumulation, within the explicit path's rounding."""
    q, k, v, valid = case(2, 8, 2, 300, 64, dtype=dtype, device=device, seed=3)
    ref_out, ref_w = kv_attention.decode_attention(q, k, v, valid, 64 ** -0.5)
    out, w = kv_decode_triton.decode_attention(q, k, v, valid, 64 ** -0.5, want_weights=True)
    assert out.dtype == dtype
    tol = 2e-2 if dtype == torch.bfloat16 else 3e-3
    torch.testing.assert_close(out.float(), ref_out.float(), atol=tol, rtol=tol)
    torch.testing.assert_close(w, ref_w, atol=tol / 10, rtol=tol)


@CPU_NEEDS_INTERPRETER
def test_split_count_does_not_change_the_result() -> None:
    q, k, v, valid = case(1, 4, 1, 515, 32, dtype=torch.float32, device="cpu", seed=5, live=0.3)
    outs = [kv_decode_triton.decode_attention(q, k, v, valid, 0.2, splits=s)[0] for s in (1, 3, 9)]
    for o in outs[1:]:
        torch.testing.assert_close(o, outs[0], atol=1e-5, rtol=1e-5)


@CPU_NEEDS_INTERPRETER
def test_a_query_with_no_live_slot_outputs_zeros() -> None:
    """A (row, head) whose slots are all invalid gives zeros, not NaN (a padding slice of a batch); the other
    rows are unaffected."""
    q, k, v, valid = case(2, 4, 2, 70, 16, dtype=torch.float32, device="cpu", seed=7)
    valid[0, 1] = False
    out, w = kv_decode_triton.decode_attention(q, k, v, valid, 0.25, want_weights=True, splits=2)
    assert torch.all(out[0, 2:] == 0) and torch.all(w[0, 2:] == 0)
    ref_out, _ = kv_attention.decode_attention(q[1:], k[1:], v[1:], valid[1:], 0.25)
    torch.testing.assert_close(out[1:], ref_out, atol=2e-5, rtol=2e-5)


def test_split_plan_fills_the_gpu_without_empty_slices() -> None:
    dev = torch.device("cpu")  # 8 "multiprocessors" off a GPU
    assert kv_decode_triton.n_splits(1, 8, 64, dev) == 1  # one block: never split
    per_sm = kv_decode_triton.PROGRAMS_PER_SM
    assert kv_decode_triton.n_splits(8, 8, 32768, dev) == 1  # 64 programs: already more than per_sm per SM
    want = -(-int(per_sm * 8) // 2)  # two (row, KV head) pairs share 8 SMs x per_sm programs
    assert kv_decode_triton.n_splits(1, 2, 32768, dev) == want
    assert kv_decode_triton.n_splits(1, 2, 3 * 64, dev) == 3  # never a slice without a whole block


def test_rejects_what_it_cannot_run() -> None:
    q, k, v, valid = case(1, 4, 2, 32, 16, dtype=torch.float32, device="cpu")
    with pytest.raises(ValueError, match="one query token"):
        kv_decode_triton.decode_attention(q.expand(1, 4, 2, 16), k, v, valid, 0.1)
    with pytest.raises(ValueError, match="power-of-two head dim"):
        kv_decode_triton.decode_attention(q[..., :12], k[..., :12], v[..., :12], valid, 0.1)


@pytest.mark.parametrize("advance", [False, True])
@pytest.mark.parametrize("device", devices())
def test_decode_write_kernel_matches_the_scatters(device, advance) -> None:
    """One-kernel decode write (fused decoding) == kv_cache.write_decode's four scatters, on strided new
    keys/values as the attention module hands them over (a transposed projection output); with ``advance``
    both move every slot on by one."""
    from tokenbench import kv_cache

    g = torch.Generator().manual_seed(11)
    b, h, c, d = 3, 2, 20, 16
    bufs = [torch.randn(b, h, c, d, generator=g), torch.randn(b, h, c, d, generator=g),
            torch.rand(b, h, c, generator=g) < 0.5, torch.randint(0, 99, (b, h, c), generator=g)]
    bufs = [t.to(device) for t in bufs]
    slot = torch.randint(0, c, (b, h), generator=g).to(device)
    new_k = torch.randn(b, 1, h, d, generator=g).to(device).transpose(1, 2)  # (B, H, 1, D), not contiguous
    new_v = torch.randn(b, 1, h, d, generator=g).to(device).transpose(1, 2)
    qvalid = torch.tensor([[True], [False], [True]], device=device)
    qpos = torch.tensor([[100], [101], [102]], device=device)
    ref, slot_ref, before = [t.clone() for t in bufs], slot.clone(), slot.clone()
    kv_cache.write_decode(*ref, slot_ref, new_k, new_v, qvalid, qpos, advance)
    kv_decode_triton.write_decode(*bufs, slot, new_k, new_v, qvalid, qpos, advance)
    for t, i, j in ((bufs[0], 1, 0), (bufs[3], 2, 1)):  # the new key / position landed in the slot written
        assert torch.equal(t[i, j, before[i, j]], new_k[i, j, 0] if t.dim() == 4 else qpos[i, 0])
    assert torch.equal(slot, slot_ref) and torch.equal(slot, before + 1 if advance else before)
    for got, want in zip(bufs, ref):
        assert torch.equal(got, want)
    assert bool(bufs[2][1].gather(1, before[1].view(h, 1)).any()) is False  # the padding row's write is invalid
