"""Optional kernel fusion for LLM decoding (``measure.fuse_kernels``): ``torch.compile`` the elementwise parts
of a decoder layer — RMSNorm (with the residual add before it, in Llama-style layers' decode steps), rotary
embedding, the gated MLP's activation, the decode attention's scaling/mask/softmax, the
decode-time methods' scoring and eviction — merge the gate/up and the query/key/value GEMMs, and write a decode
step's key/value into the eviction cache with one Triton kernel, so a decode step is not dominated by hundreds
of tiny kernels. Profiling a Llama-3.1-8B decode step on an H200 (batch 8, 32k context,
``results/perf/kv/profile_decode.py``) showed ~3.5 ms of its ~10 ms in elementwise kernels of 1-3 µs each,
next to 4.5 ms of weight GEMVs. Weight products of at most 16 rows (decode steps) run as Triton GEMVs
(``gemv_triton``, faster than cuBLAS's tilings at these shapes; ``GEMV`` switches back), the gated MLP's
activation in the gate/up product's epilogue; a long prefill's products stay cuBLAS.

Same numerics as the transformers modules they replace (float32 RMSNorm, weight multiplied in the input dtype;
the GEMVs accumulate in float32 and round once, as cuBLAS does, in another summation order);
applied to every method alike, the baseline included. Patches the model *instances* (and, process-wide, the
modeling module's ``apply_rotary_pos_emb``, the kv decode attention and the decode-time methods' scoring and
eviction step, ``families.kv.decode_evict``), so it
works for Llama, Qwen2/3, Mistral and other models built from the same parts.
"""

from __future__ import annotations

import sys
from typing import Any, Callable, Iterator, Optional

import torch
import torch.nn.functional as F

_compiled: dict[str, Callable] = {}
# the decode step's weight products: "triton" (gemv_triton: one streaming pass per weight, the gated MLP's
# activation in the gate/up product's epilogue; H200, Llama-3.1-8B at batch 8: 113.8 vs 123.2 us per layer,
# results/perf/kv/gemv_triton_h200.json) or "cublas" (F.linear); products of more than
# gemv_triton.MAX_ROWS rows (a long prefill) always use F.linear
GEMV = ["triton"]


def _gemv_takes(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether ``x @ weight.T`` runs as the Triton GEMV (``GEMV`` selects it and the kernel takes the shapes)."""
    from tokenbench import gemv_triton

    return GEMV[0] == "triton" and gemv_triton.supported(x, weight)


def _linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    from tokenbench import gemv_triton

    return gemv_triton.linear(x, weight, bias) if _gemv_takes(x, weight) else F.linear(x, weight, bias)


# Compiled variants kept per function: the eviction step is compiled per method (its state tensors) and per
# cache shape (static shapes), so a sweep of methods x shapes in one process outgrows dynamo's default of 8,
# and under fullgraph=True hitting the limit is an error, not a fallback (seen in the KV grid, H200)
RECOMPILE_LIMIT = 128
COMPILE_BACKEND = "inductor"  # "eager": dynamo's tracing and guards without code generation (quick tests)
# inductor options of the compiled eviction step (A/B runs: results/perf/kv/ab_evict_options.py; none by default)
EVICT_OPTIONS: dict[str, Any] = {}


def _compile(name: str, fn: Callable, dynamic: bool | None = True, **options: Any) -> Callable:
    if name not in _compiled:
        config = torch._dynamo.config
        config.recompile_limit = max(config.recompile_limit, RECOMPILE_LIMIT)
        config.accumulated_recompile_limit = max(config.accumulated_recompile_limit, 8 * RECOMPILE_LIMIT)
        inductor = COMPILE_BACKEND == "inductor"
        _compiled[name] = torch.compile(fn, dynamic=dynamic, fullgraph=True, backend=COMPILE_BACKEND,
                                        options=(options or None) if inductor else None)
    return _compiled[name]


def _tensors(obj: Any) -> Iterator[torch.Tensor]:
    """The tensors an object holds directly, in tuples or in dicts (one level)."""
    for value in vars(obj).values():
        if isinstance(value, torch.Tensor):
            yield value
        elif isinstance(value, (tuple, list)):
            yield from (v for v in value if isinstance(v, torch.Tensor))
        elif isinstance(value, dict):
            yield from (v for v in value.values() if isinstance(v, torch.Tensor))


def _static_shapes(step: Callable) -> Callable:
    """The compiled eviction step with every tensor of its context (and the context's cache layer) marked
    static: a method gets one compiled variant per cache shape. Left to dynamo, the second shape a method meets
    turns its shapes symbolic for good, and those kernels were slower (H200, 32k/b8/keep 10%, fused decode:
    scissorhands 6.44-6.54 ms per step compiled symbolic in the grid against 5.89 static, tova 5.92-6.02
    against 5.73, streaming_llm 5.29-5.51; results/perf/kv/ab_evict_options_h200.json)."""

    def call(method: Any, ctx: Any, cap: torch.Tensor) -> torch.Tensor:
        for t in (*_tensors(ctx), *_tensors(ctx.layer), cap):
            torch._dynamo.mark_static(t)
        return step(method, ctx, cap)

    return call


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    h = x.to(torch.float32)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)


def _silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return F.silu(gate) * up


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2:]
    return torch.cat((-x2, x1), dim=-1)


def _add_rms_norm(residual: torch.Tensor, x: torch.Tensor, weight: torch.Tensor,
                  eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``residual + x`` and its RMSNorm, in one kernel (compiled with explicit casts: the sum is rounded to the
    input dtype before the norm reads it, as in the unfused layer)."""
    h = residual + x
    return h, _rms_norm(h, weight, eps)


def _rope(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
          unsqueeze_dim: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    cos, sin = cos.unsqueeze(unsqueeze_dim), sin.unsqueeze(unsqueeze_dim)
    return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin


_LAYER_PARTS = ("input_layernorm", "self_attn", "post_attention_layernorm", "mlp")


def _llama_layer_code() -> Any:
    import inspect

    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    return inspect.unwrap(LlamaDecoderLayer.forward).__code__


def _is_llama_layer(layer: torch.nn.Module) -> bool:
    """A pre-norm decoder layer whose forward is Llama's, byte for byte (Qwen2/3 and Mistral reuse it): norm,
    attention, residual add, norm, MLP, residual add."""
    import inspect

    if not all(hasattr(layer, a) for a in _LAYER_PARTS):
        return False
    code, ref = inspect.unwrap(type(layer).forward).__code__, _llama_layer_code()
    return (code.co_code, code.co_names, code.co_consts) == (ref.co_code, ref.co_names, ref.co_consts)


class _Pending:
    """Norm outputs computed ahead, by the kernel that formed their input (the previous residual add): the
    next norm module returns its entry when called on that very tensor, and computes its own otherwise."""

    def __init__(self) -> None:
        self.ahead: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.hits = 0  # norms served from ``ahead`` (what the tests check)

    def norm_forward(self, mod: torch.nn.Module, rms: Callable) -> Callable:
        def forward(x: torch.Tensor) -> torch.Tensor:
            got = self.ahead.pop(id(mod), None)
            if got is not None and got[0] is x:
                self.hits += 1
                return got[1]
            return rms(x, mod.weight, mod.variance_epsilon)

        return forward

    def layer_forward(self, layer: torch.nn.Module, next_norm: Optional[torch.nn.Module],
                      add_rms: Callable) -> Callable:
        """Llama's decoder-layer forward with each residual add fused into the RMSNorm that reads its sum: the
        layer's own post-attention norm, and the next layer's input norm (or the model's final norm). Decode
        steps only: a long prefill keeps the original's order of frees (one hidden-size buffer fewer at peak)."""
        post = layer.post_attention_layernorm
        original = layer.forward

        def forward(hidden_states: torch.Tensor, **kwargs: Any) -> torch.Tensor:
            if hidden_states.shape[1] != 1:
                return original(hidden_states, **kwargs)
            if "past_key_values" in kwargs:  # transformers' deprecated name, as the original's decorator maps it
                kwargs["cache"] = kwargs.pop("past_key_values")
            attn, _ = layer.self_attn(hidden_states=layer.input_layernorm(hidden_states), **kwargs)
            hidden, normed = add_rms(hidden_states, attn, post.weight, post.variance_epsilon)
            out = layer.mlp(normed)
            if next_norm is None:
                return hidden + out
            hidden, normed = add_rms(hidden, out, next_norm.weight, next_norm.variance_epsilon)
            self.ahead[id(next_norm)] = (hidden, normed)
            return hidden

        return forward


def _fuse_layers(model: torch.nn.Module, pending: _Pending, add_rms: Callable) -> int:
    """Patch every Llama-style decoder layer (see ``_Pending.layer_forward``); returns how many."""
    n = 0
    for mod in model.modules():
        layers = getattr(mod, "layers", None)
        if not isinstance(layers, torch.nn.ModuleList) or not len(layers) or not all(map(_is_llama_layer, layers)):
            continue
        final = getattr(mod, "norm", None)
        norms = [layer.input_layernorm for layer in layers[1:]] + [final]
        for layer, nxt in zip(layers, norms):
            ok = nxt is not None and hasattr(nxt, "variance_epsilon") and getattr(nxt, "weight", None) is not None
            layer.forward = pending.layer_forward(layer, nxt if ok else None, add_rms)
            n += 1
    return n


def _fused_mlp(m: torch.nn.Module, silu_mul: Callable) -> Callable:
    """One GEMM for gate and up: their weights become two views of one concatenated matrix (no copy kept)."""
    n = m.gate_proj.weight.shape[0]
    w = torch.cat([m.gate_proj.weight.data, m.up_proj.weight.data])
    m.gate_proj.weight.data, m.up_proj.weight.data = w[:n], w[n:]

    def forward(x: torch.Tensor) -> torch.Tensor:
        if _gemv_takes(x, w):
            from tokenbench import gemv_triton

            return m.down_proj(gemv_triton.silu_mul_linear(x, w))
        gate, up = F.linear(x, w).split(n, dim=-1)
        return m.down_proj(silu_mul(gate, up))

    return forward


def _fused_qkv(attn: torch.nn.Module) -> bool:
    """One GEMM for the query, key and value projections (their weights become views of one matrix): the
    attention module calls ``q_proj``, ``k_proj``, ``v_proj`` on the same input in turn, so ``q_proj`` computes
    all three and hands ``k_proj``/``v_proj`` their parts; called on any other input they compute their own.
    On an H200 at batch 8 the separate 8 MB key/value GEMVs ran at a third of the bandwidth."""
    projs = [getattr(attn, n, None) for n in ("q_proj", "k_proj", "v_proj")]
    if not all(isinstance(p, torch.nn.Linear) for p in projs):
        return False
    biases = [p.bias for p in projs]
    if any(b is None for b in biases) and not all(b is None for b in biases):
        return False
    sizes = [p.weight.shape[0] for p in projs]
    w = torch.cat([p.weight.data for p in projs])
    bias = None if biases[0] is None else torch.cat([b.data for b in biases])
    for p, wv, bv in zip(projs, w.split(sizes), bias.split(sizes) if bias is not None else [None] * 3):
        p.weight.data = wv
        if bv is not None:
            p.bias.data = bv
    stash: dict[str, Any] = {}

    def q_forward(x: torch.Tensor) -> torch.Tensor:
        qo, ko, vo = _linear(x, w, bias).split(sizes, dim=-1)
        stash.update(x=x, k=ko, v=vo)
        return qo

    def part(name: str, proj: torch.nn.Linear) -> Callable:
        def forward(x: torch.Tensor) -> torch.Tensor:
            if stash.get("x") is x and name in stash:
                out = stash.pop(name)
                if "k" not in stash and "v" not in stash:
                    stash.clear()  # hold no activations between forwards
                return out
            return _linear(x, proj.weight, proj.bias)

        return forward

    projs[0].forward = q_forward
    projs[1].forward, projs[2].forward = part("k", projs[1]), part("v", projs[2])
    return True


def _linear_forward(m: torch.nn.Linear) -> Callable:
    def forward(x: torch.Tensor) -> torch.Tensor:
        return _linear(x, m.weight, m.bias)

    return forward


_GREEDY_CHUNKS = 64  # slices of the vocabulary reduced side by side in the greedy pick's first stage


def _argmax(logits: torch.Tensor) -> torch.Tensor:
    """``logits.argmax(-1)`` of ``(B, V)`` in two stages: the maximum of each of ``_GREEDY_CHUNKS`` slices,
    then the best slice. Ties resolve as ``argmax`` does, to the first index (first within a slice, first
    slice among equal maxima)."""
    b, v = logits.shape
    sliced = F.pad(logits, (0, -v % _GREEDY_CHUNKS), value=float("-inf")).view(b, _GREEDY_CHUNKS, -1)
    best, where = sliced.max(dim=-1)
    chunk = best.argmax(dim=-1, keepdim=True)
    return (where.gather(1, chunk) + chunk * sliced.shape[-1]).squeeze(1)


def greedy() -> Callable[[torch.Tensor], torch.Tensor]:
    """The decode loop's greedy pick, compiled in two stages: a one-stage ``argmax`` over a 128k vocabulary
    at batch 8 runs one block per row, 26.8 µs eager and 22.0 µs compiled on an H200, against 5.6 µs for
    this (``results/perf/kv/bench_greedy.py``). Same result."""
    return _compile("greedy", _argmax, dynamic=False)


def fuse(model: torch.nn.Module) -> dict[str, int]:
    """Patch ``model`` in place; returns how many modules of each kind were fused. Idempotent."""
    if getattr(model, "_tokenbench_fused", None) is not None:
        return model._tokenbench_fused
    counts = {"rms_norm": 0, "mlp": 0, "rope": 0, "qkv": 0, "add_norm_layers": 0, "linear": 0}
    rms = _compile("rms", _rms_norm)
    silu_mul = _compile("silu_mul", _silu_mul)
    pending = _Pending()
    for m in model.modules():
        name = type(m).__name__
        if name.endswith("RMSNorm") and hasattr(m, "variance_epsilon") and getattr(m, "weight", None) is not None:
            m.forward = pending.norm_forward(m, rms)
            counts["rms_norm"] += 1
        elif all(hasattr(m, a) for a in ("gate_proj", "up_proj", "down_proj", "act_fn")):
            act = getattr(getattr(m, "config", None), "hidden_act", None)
            if act in ("silu", "swish") and m.gate_proj.bias is None and m.up_proj.bias is None:
                m.forward = _fused_mlp(m, silu_mul)
                counts["mlp"] += 1
        elif name.endswith("Attention") and hasattr(m, "layer_idx"):
            counts["qkv"] += _fused_qkv(m)
            module = sys.modules.get(type(m).__module__)
            if module is not None and hasattr(module, "apply_rotary_pos_emb"):
                if not getattr(module.apply_rotary_pos_emb, "_tokenbench", False):
                    fused: Any = _compile("rope", _rope)
                    fused._tokenbench = True
                    module.apply_rotary_pos_emb = fused
                counts["rope"] += 1
    for m in model.modules():  # the other projections (o_proj, down_proj, lm_head): through ``_linear``
        if isinstance(m, torch.nn.Linear) and "forward" not in vars(m):
            m.forward = _linear_forward(m)
            counts["linear"] += 1
    if counts["rms_norm"]:
        add_rms = _compile("add_rms", _add_rms_norm, emulate_precision_casts=True)
        counts["add_norm_layers"] = _fuse_layers(model, pending, add_rms)
        model._tokenbench_pending = pending
    from tokenbench import kv_attention

    kv_attention.DECODE_IMPL[0] = _compile("decode_attention", kv_attention.decode_attention)
    from tokenbench import kv_cache, kv_decode_triton

    if kv_decode_triton.available():  # not torch.compile: inductor copies a mutated input whole (the cache!)
        kv_cache.WRITE_IMPL[0] = kv_decode_triton.write_decode
    from tokenbench.families import kv as kv_family

    # dynamic=None: a method's integer settings (scissorhands' history window, used in bit masks) stay
    # constants (a compiled ``2 ** s`` fails in inductor on GPU) unless they vary (a layer index turns
    # symbolic instead of costing a variant per layer); the tensors' shapes are marked static
    kv_family.EVICT_IMPL[0] = _static_shapes(_compile("decode_evict", kv_family.decode_evict, dynamic=None,
                                                      **EVICT_OPTIONS))
    model._tokenbench_fused = counts
    return counts
