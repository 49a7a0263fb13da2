"""The Triton GEMV of the decode step's weight products (tokenbench.gemv_triton), against F.linear: in Triton's
interpreter on CPU (float16: the interpreter mangles bfloat16) and, on a GPU, in bfloat16 at Llama shapes."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton")

from tokenbench import gemv_triton  # noqa: E402 (after the importorskip)

CPU_ONLY = pytest.mark.skipif(torch.cuda.is_available(), reason="the interpreter runs without a GPU only")


def rand(*shape: int, seed: int, dtype: torch.dtype = torch.float16, device: str = "cpu") -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g) / shape[-1] ** 0.25).to(dtype=dtype, device=device)


@CPU_ONLY
@pytest.mark.parametrize("rows,n,k,config", [
    (8, 64, 512, gemv_triton.Config(32, 256)),  # even: no masks on the weight
    (3, 40, 300, gemv_triton.Config(16, 128)),  # ragged features and reduction
    (1, 32, 256, gemv_triton.Config(32, 256, num_stages=2)),
    (16, 64, 256, gemv_triton.Config(64, 64)),  # the most rows the kernel takes
])
def test_linear_matches_f_linear(rows: int, n: int, k: int, config: gemv_triton.Config) -> None:
    x, w, bias = rand(1, rows, k, seed=rows), rand(n, k, seed=n), rand(n, seed=k)
    assert gemv_triton.supported(x, w)
    want = F.linear(x.float(), w.float())
    got = gemv_triton.linear(x, w, config=config)
    assert got.dtype == x.dtype and got.shape == (1, rows, n)
    torch.testing.assert_close(got.float(), want, atol=2e-3, rtol=2e-3)  # float32 sums, one rounding
    torch.testing.assert_close(gemv_triton.linear(x, w, bias, config=config), got + bias)


@CPU_ONLY
@pytest.mark.parametrize("n,k,config", [(64, 256, gemv_triton.Config(16, 128)), (40, 300, gemv_triton.Config(16, 64))])
def test_gated_epilogue_is_silu_gate_times_up(n: int, k: int, config: gemv_triton.Config) -> None:
    """The gate/up weight stacked (gate rows over up rows): ``silu(gate) * up`` with gate and up rounded to
    the input dtype first, as the unfused MLP computes it."""
    x, w = rand(5, k, seed=1), rand(n, k, seed=2)
    gate, up = gemv_triton.linear(x, w, config=config).split(n // 2, dim=-1)
    got = gemv_triton.silu_mul_linear(x, w, config=config)
    assert got.shape == (5, n // 2)
    torch.testing.assert_close(got, F.silu(gate) * up, atol=1e-3, rtol=1e-3)
    with pytest.raises(ValueError, match="even count"):
        gemv_triton.silu_mul_linear(x, w[:-1])


def test_unsupported_products_fall_back_to_f_linear() -> None:
    """More rows than the kernel's tile, float32, a transposed weight, bfloat16 in the interpreter: F.linear
    (same result as calling it)."""
    w = rand(32, 64, seed=0)
    cases = [(rand(17, 64, seed=1), w), (rand(4, 64, seed=2, dtype=torch.float32), w.float()),
             (rand(4, 64, seed=3), rand(64, 32, seed=4).t()), (rand(4, 64, seed=5, dtype=torch.bfloat16),
                                                                w.bfloat16())]
    for x, weight in cases:
        if not x.is_cuda:
            assert not gemv_triton.supported(x, weight)
        if x.dtype != torch.float16:  # CPU half matmul: only where torch has it
            torch.testing.assert_close(gemv_triton.linear(x, weight), F.linear(x, weight))


def test_tuned_configs_and_their_analogy() -> None:
    """Llama-3.1-8B's weight shapes take their measured configs; unknown wide/narrow weights the analogous ones."""
    assert gemv_triton.config_for(28672, 4096) == gemv_triton.TUNED[(28672, 4096)]
    assert gemv_triton.config_for(50000, 1024).block_n == 64
    assert gemv_triton.config_for(2048, 2048).block_n == 32


@CPU_ONLY
def test_fused_decode_runs_its_weight_products_through_the_gemv(monkeypatch) -> None:
    """A float16 tiny Llama under ``fuse_kernels``: with the Triton GEMV (the default) the q/k/v, o_proj, gated
    MLP, down and lm_head products of at most 16 rows go through it (decode steps, the short question forward),
    the long prefix forward's do not, and the greedy tokens and logits match the cuBLAS-path run."""
    import sys

    from tokenbench import fused_decode, kv_attention, kv_cache
    from tokenbench.config import MeasureSettings
    from tokenbench.families import kv as kv_family
    from tokenbench.lm import LMRunner, Prompt
    from tokenbench.models.tiny import TinyLlama
    from tokenbench.registry import METHODS, load_all

    load_all()
    loaded = TinyLlama(num_hidden_layers=2, dtype="float16", attn_implementation="sdpa").load()
    modeling = sys.modules[type(loaded.model.model.layers[0].self_attn).__module__]
    monkeypatch.setattr(modeling, "apply_rotary_pos_emb", modeling.apply_rotary_pos_emb)
    monkeypatch.setattr(kv_attention, "DECODE_IMPL", list(kv_attention.DECODE_IMPL))
    monkeypatch.setattr(kv_family, "EVICT_IMPL", list(kv_family.EVICT_IMPL))
    monkeypatch.setattr(kv_cache, "WRITE_IMPL", list(kv_cache.WRITE_IMPL))
    monkeypatch.setattr(fused_decode, "GEMV", ["cublas"])
    calls: list[tuple[int, int, bool]] = []
    launch = gemv_triton._launch

    def counted(x, weight, n_out, gated, config):
        calls.append((x.numel() // x.shape[-1], weight.shape[0], gated))
        return launch(x, weight, n_out, gated, config)

    monkeypatch.setattr(gemv_triton, "_launch", counted)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 390, (2, 30), generator=g)
    p = Prompt(ids[:, :24], ids[:, 24:])
    method = METHODS.get("streaming_llm", "kv").cls(keep_ratio=0.5)
    outs = {}
    for gemv in ("cublas", "triton"):
        fused_decode.GEMV[0] = gemv
        runner = LMRunner(copy.deepcopy(loaded), method, MeasureSettings(warmup=0, fuse_kernels=True))
        assert runner.fused["linear"] == 2 * 4 + 1  # o/gate/up/down per layer (gate, up unused), lm_head
        outs[gemv] = runner.generate(p, 4, 4, return_logits=True)
        assert bool(calls) == (gemv == "triton")
    # products of at most 16 rows: the 48-row prefix forward's stay cuBLAS but for its lm_head (last position,
    # 2 rows); the 12-row question forward and 3 decode steps run 2 layers x (q/k/v, o_proj, gated MLP, down)
    # + lm_head each
    assert len(calls) == 1 + 4 * (2 * 4 + 1) and {rows for rows, _, _ in calls} == {2, 12}
    assert sum(gated for _, _, gated in calls) == 4 * 2
    a, b = outs["cublas"], outs["triton"]
    assert torch.equal(a.tokens, b.tokens)
    for x, y in zip(a.logits, b.logits):
        torch.testing.assert_close(y, x, atol=2e-2, rtol=2e-2)


@pytest.mark.gpu
@pytest.mark.parametrize("n,k", sorted(gemv_triton.TUNED))
def test_llama_shapes_on_the_gpu(n: int, k: int) -> None:
    """bfloat16 on a GPU at the tuned shapes, 1 and 8 rows: F.linear within bfloat16 rounding; the gated
    epilogue at the gate/up shape."""
    for rows in (1, 8):
        x, w = rand(rows, k, seed=rows, dtype=torch.bfloat16, device="cuda"), rand(n, k, seed=n, dtype=torch.bfloat16,
                                                                                     device="cuda")
        torch.testing.assert_close(gemv_triton.linear(x, w).float(), F.linear(x.float(), w.float()),
                                   atol=3e-2, rtol=1e-2)
        if n == 28672:
            gate, up = F.linear(x, w).split(n // 2, dim=-1)
            torch.testing.assert_close(gemv_triton.silu_mul_linear(x, w), F.silu(gate) * up, atol=3e-2, rtol=2e-2)
