"""VLM family: every registered vlm method runs end to end on a tiny random-weight LLaVA with a real photo
(skimage's astronaut), keeps exactly its budget of visual tokens (counted by hooks on the language model's
decoder layers, not by trusting the method), is a no-op at keep-all (the logits of transformers' own LLaVA
forward), fails with one line on impossible budgets; plus each method's rule on hand-built tensors and its
attention scores against transformers' eager attention maps."""

from __future__ import annotations

import pytest
import torch
from tokenbench.errors import IncompatibleError, TokenbenchError
from tokenbench.families.vlm import LLMContext, VisionContext
from tokenbench.models.llava import TinyLlava
from tokenbench.registry import METHODS, load_all
from tokenbench.task import Sample
from tokenbench.vlm import VLMRunner

load_all()

VLM_METHODS = METHODS.family("vlm")
IDS = [c.registered_name for c in VLM_METHODS]
BUDGETED = [c for c in VLM_METHODS if c.takes_budget]
BUDGET_IDS = [c.registered_name for c in BUDGETED]
N_VISUAL = 64  # tiny-llava: 64x64 image, 8x8 patches


@pytest.fixture(scope="module")
def tiny():
    return TinyLlava().load()


@pytest.fixture(scope="module")
def sample():
    s = Sample(id="astronaut", question="What is the person wearing?\nAnswer the question using a single word or "
               "phrase.", max_new_tokens=4)
    s.image = "skimage:astronaut"
    return s


@pytest.fixture(scope="module")
def inputs(tiny, sample):
    return VLMRunner(tiny).build_inputs(sample)


@pytest.fixture(scope="module")
def reference(tiny, inputs):
    """transformers' own LLaVA forward: the last position's logits."""
    with torch.inference_mode():
        out = tiny.model(input_ids=inputs["input_ids"], pixel_values=inputs["pixel_values"])
    return out.logits[:, -1].float()


def layer_tokens(model, fn):
    """Tokens every decoder layer of the language model processes while ``fn`` runs (its output length,
    read by hooks independent of the method's own)."""
    seen: list[int] = []

    def hook(module, args, output):  # the sequence a layer computed (after any cut made before it)
        h = output[0] if isinstance(output, tuple) else output
        seen.append(int(h.shape[1]))

    handles = [layer.register_forward_hook(hook) for layer in model.model.language_model.layers]
    try:
        result = fn()
    finally:
        for h in handles:
            h.remove()
    return seen, result


def test_builtin_vlm_methods_registered() -> None:
    assert {"none", "random", "fastervlm", "visionzip", "fastv", "dart"} <= set(IDS)


@pytest.mark.parametrize("cls", VLM_METHODS, ids=IDS)
def test_keep_all_is_a_noop(cls, tiny, inputs, reference) -> None:
    """At keep-all (the default, and n_keep = every visual token) the logits are transformers' own."""
    for kw in ({}, {} if not cls.takes_budget else {"n_keep": N_VISUAL}):
        logits, stats = VLMRunner(tiny, cls(**kw)).prefill_logits(inputs)
        torch.testing.assert_close(logits, reference, atol=1e-5, rtol=1e-5)
        assert stats["visual_tokens_kept"] == N_VISUAL and stats["achieved_keep_ratio"] == 1.0


@pytest.mark.parametrize("cls", BUDGETED, ids=BUDGET_IDS)
@pytest.mark.parametrize("budget", [{"n_keep": 10}, {"keep_ratio": 0.25}])
def test_budget_reaches_the_language_model(cls, budget, tiny, inputs, sample) -> None:
    """Exactly the budget of visual tokens reaches the language model (vision-stage methods: every layer;
    in-LM methods: every layer from the prune layer on, all tokens before it); the run ends to end."""
    method = cls(**budget)
    keep = budget.get("n_keep") or int(budget["keep_ratio"] * N_VISUAL)
    n_text = int(inputs["input_ids"].shape[1]) - N_VISUAL
    runner = VLMRunner(tiny, method)
    seen, (logits, stats) = layer_tokens(tiny.model, lambda: runner.prefill_logits(inputs))
    k = getattr(method, "prune_layer", 0) if method.stage == "llm" else 0
    assert seen == [n_text + N_VISUAL] * k + [n_text + keep] * (len(seen) - k)
    assert stats["visual_tokens_kept"] == keep and stats["visual_tokens_in"] == N_VISUAL
    assert stats["achieved_keep_ratio"] == pytest.approx(keep / N_VISUAL)
    assert torch.isfinite(logits).all()
    out = runner.run(sample)  # end to end: prompt, method, greedy decoding, measurements
    assert 1 <= out.n_generated <= sample.max_new_tokens
    assert out.compression["visual_tokens_kept"] == keep
    assert out.latency["prefill_ms"] > 0 and out.latency["ttft_ms"] >= out.latency["prefill_ms"]
    assert out.latency["e2e_ms"] >= out.latency["ttft_ms"]


def test_random_is_deterministic_under_its_seed(tiny, inputs) -> None:
    cls = METHODS.get("random", "vlm").cls
    a, _ = VLMRunner(tiny, cls(n_keep=12, seed=1)).prefill_logits(inputs)
    b, _ = VLMRunner(tiny, cls(n_keep=12, seed=1)).prefill_logits(inputs)
    c, _ = VLMRunner(tiny, cls(n_keep=12, seed=2)).prefill_logits(inputs)
    assert torch.equal(a, b) and not torch.equal(a, c)
    # per image, not per call: the same image draws the same tokens again (warm-up, repeats, resumed runs) ...
    runner = VLMRunner(tiny, cls(n_keep=12, seed=1))
    assert torch.equal(runner.prefill_logits(inputs)[0], runner.prefill_logits(inputs)[0])
    # ... and another image other tokens
    x = torch.randn(2, 64, 3)
    ctx = VisionContext(features=x, n_keep=5, pixels=torch.stack([torch.zeros(3, 4, 4), torch.ones(3, 4, 4)]))
    out = cls(n_keep=5, seed=1).reduce(ctx)
    picked = [[int((x[i] == row).all(-1).nonzero()) for row in out[i]] for i in range(2)]
    assert picked[0] != picked[1] and all(p == sorted(p) for p in picked)


@pytest.mark.parametrize("cls", BUDGETED, ids=BUDGET_IDS)
def test_bad_budgets_fail_with_one_line(cls, tiny, inputs) -> None:
    for bad in ({"keep_ratio": 0.0}, {"keep_ratio": 1.5}, {"n_keep": 0}, {"n_keep": 2.5}, {"keep_ratio": True}):
        with pytest.raises(TokenbenchError, match="keep_ratio|n_keep"):
            cls(**bad)
    with pytest.raises(TokenbenchError, match="exceeds the 64 visual tokens"):
        VLMRunner(tiny, cls(n_keep=N_VISUAL + 1)).prefill_logits(inputs)


def test_method_specific_errors(tiny, inputs) -> None:
    with pytest.raises(TokenbenchError, match="takes no budget"):
        METHODS.get("none", "vlm").cls(keep_ratio=0.5)
    with pytest.raises(TokenbenchError, match="prune_layer must be in"):
        VLMRunner(tiny, METHODS.get("fastv", "vlm").cls(n_keep=8, prune_layer=4))
    with pytest.raises(TokenbenchError, match="below its minimum"):
        VLMRunner(tiny, METHODS.get("visionzip", "vlm").cls(n_keep=1)).prefill_logits(inputs)
    with pytest.raises(TokenbenchError, match="pivot"):
        METHODS.get("dart", "vlm").cls(pivot_image_token=0, pivot_text_token=0)


def test_incompatible_models_say_why(tiny) -> None:
    from tokenbench.models.base import LoadedModel

    with pytest.raises(IncompatibleError, match="LlavaForConditionalGeneration"):
        VLMRunner(LoadedModel(model=torch.nn.Linear(2, 2), tokenizer=tiny.tokenizer), METHODS.get("none", "vlm").cls())
    full = TinyLlava().load()
    full.model.config.vision_feature_select_strategy = "full"
    for name in ("fastervlm", "visionzip"):
        with pytest.raises(IncompatibleError, match="vision_feature_select_strategy"):
            VLMRunner(full, METHODS.get(name, "vlm").cls(n_keep=8))
    full.model.config.vision_config.model_type = "siglip_vision_model"
    with pytest.raises(IncompatibleError, match="needs a \\[CLS\\] token"):
        VLMRunner(full, METHODS.get("fastervlm", "vlm").cls(n_keep=8))
    VLMRunner(full, METHODS.get("fastv", "vlm").cls(n_keep=8))  # in-LM methods need no [CLS]


@pytest.mark.parametrize("name", ["fastv", "dart"])
def test_in_llm_pruning_decodes_the_same_with_eager_and_sdpa(name, sample) -> None:
    """After the cut, layers hold caches of different lengths: decoding must not depend on the attention kernel."""
    outs = []
    for attn in ("sdpa", "eager"):
        runner = VLMRunner(TinyLlava(attn_implementation=attn).load(), METHODS.get(name, "vlm").cls(n_keep=12))
        runner.measure.warmup = 0
        outs.append(runner.generate(runner.build_inputs(sample), 6, 6)["ids"])
    assert outs[0] == outs[1]


# --- scores against transformers' eager attention maps ------------------------------------------------------


def test_cls_attention_and_last_token_attention_match_eager_maps(sample) -> None:
    eager = TinyLlava(attn_implementation="eager").load()
    model = eager.model
    runner = VLMRunner(eager)
    inputs = runner.build_inputs(sample)
    with torch.inference_mode():
        out = model(input_ids=inputs["input_ids"], pixel_values=inputs["pixel_values"], output_attentions=True)
        vis = model.model.vision_tower(inputs["pixel_values"], output_attentions=True, output_hidden_states=True)
    # [CLS] row of the vision feature layer (-2), mean over heads, patch columns
    want_cls = vis.attentions[-2][:, :, 0, 1:].mean(dim=1)
    seen: dict[str, torch.Tensor] = {}
    fastervlm = METHODS.get("fastervlm", "vlm").cls

    class ProbeCLS(fastervlm):
        def reduce(self, ctx: VisionContext) -> torch.Tensor:
            seen["cls"] = ctx.cls_attention()
            return super().reduce(ctx)

    VLMRunner(eager, ProbeCLS(n_keep=8)).prefill_logits(inputs)
    torch.testing.assert_close(seen["cls"], want_cls.float(), atol=1e-5, rtol=1e-4)
    # FastV: layer K-1's attention of the last token (mean over heads)
    fastv = METHODS.get("fastv", "vlm").cls

    class ProbeLast(fastv):
        def select(self, ctx: LLMContext) -> torch.Tensor:
            seen["last"] = ctx.last_attention()
            return super().select(ctx)

    VLMRunner(eager, ProbeLast(n_keep=8, prune_layer=2)).prefill_logits(inputs)
    want_last = out.attentions[1][:, :, -1].mean(dim=1)
    torch.testing.assert_close(seen["last"], want_last.float(), atol=1e-5, rtol=1e-4)


# --- each method's rule on hand-built tensors ---------------------------------------------------------------


class FixedVision(VisionContext):
    """A vision context whose [CLS] attention and keys are given."""

    def __init__(self, features, n_keep, cls_features, attention, keys):
        super().__init__(features=features, n_keep=n_keep, cls_features=cls_features)
        self._att, self._k = attention, keys

    def cls_attention(self):
        return self._att

    def keys(self):
        return self._k


def test_fastervlm_keeps_the_top_cls_attention_tokens_in_order() -> None:
    x = torch.arange(8.0).view(1, 8, 1).repeat(1, 1, 3)
    att = torch.tensor([[0.05, 0.30, 0.01, 0.20, 0.02, 0.25, 0.07, 0.10]])
    out = METHODS.get("fastervlm", "vlm").cls(n_keep=3).reduce(FixedVision(x, 3, None, att, None))
    assert out[0, :, 0].tolist() == [1.0, 3.0, 5.0]  # tokens 1, 5, 3 by attention, kept in spatial order


def test_visionzip_dominant_and_contextual_tokens() -> None:
    n, c = 10, 2
    x = torch.arange(n * c, dtype=torch.float32).view(1, n, c)
    cls = torch.full((1, c), -1.0)
    att = torch.tensor([[0.0, 0.5, 0.0, 0.0, 0.3, 0.0, 0.0, 0.0, 0.0, 0.2]])
    # keys: two directions; remaining tokens 0,2,3,5,6,7,8,9 (after the dominant 1, 4); with 2 contextual
    # targets, step = 8 // 2 = 4 -> targets are remaining positions 0 and 4 (tokens 0 and 6)
    e0, e1 = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    keys = torch.stack([e0, e0, e0, e1, e0, e1, e1, e0, e1, e0]).unsqueeze(0)
    method = METHODS.get("visionzip", "vlm").cls(n_keep=5, n_contextual=2)
    assert method.split(5) == (3, 2)
    out = method.reduce(FixedVision(x, 5, cls, att, keys))
    assert out.shape == (1, 5, c)
    torch.testing.assert_close(out[0, 0], cls[0])  # [CLS] first
    torch.testing.assert_close(out[0, 1:3], x[0, [1, 4]])  # dominant: tokens 1 and 4, in order
    # contextual: target 0 (key e0) collects 2, 7, 9; target 6 (key e1) collects 3, 5, 8;
    # each is the target's feature plus the mean of the features assigned to it (the reference's sum)
    torch.testing.assert_close(out[0, 3], x[0, 0] + x[0, [2, 7, 9]].mean(0))
    torch.testing.assert_close(out[0, 4], x[0, 6] + x[0, [3, 5, 8]].mean(0))
    default = METHODS.get("visionzip", "vlm").cls(n_keep=64)
    assert default.split(64) == (54, 10) and default.split(128) == (108, 20) and default.split(192) == (162, 30)


def test_fastv_drops_the_lowest_last_token_attention() -> None:
    att = torch.tensor([[0.1, 0.1, 0.05, 0.3, 0.01, 0.2, 0.02, 0.2]])  # 2 text, 4 visual, 2 text
    ctx = LLMContext(layer=2, hidden=torch.zeros(1, 8, 4), visual_start=2, n_visual=4, n_keep=2,
                     _last_attention=lambda: att)
    kept = METHODS.get("fastv", "vlm").cls(n_keep=2).select(ctx)
    assert sorted(kept[0].tolist()) == [1, 3]  # visual tokens 3 and 5 in the sequence


def test_dart_keeps_pivots_and_drops_near_duplicates() -> None:
    """8 visual tokens, 5 of them near-copies of one direction; the visual pivot (largest key L1 norm) is one
    of the copies: it is kept, its share goes to the token least similar to it, the text pivot's share to the
    token least similar to the text pivot; no other copy survives."""
    from tokenbench.methods.dart import dart_select

    a, b, c = torch.tensor([1.0, 0, 0]), torch.tensor([0, 1.0, 0]), torch.tensor([-1.0, 0.2, 0])
    visual = [a, a * 1.01, a * 0.99, b, a * 1.02, c, a * 0.98, b * 1.01]
    text_pivot = torch.tensor([0.3, -1.0, 0])
    hidden = torch.stack([b, b, *visual, b, text_pivot])  # 2 text, 8 visual, 2 text
    keys = torch.full((12, 4), 0.1)
    keys[2] = 5.0  # visual pivot: visual token 0
    keys[11] = 3.0  # text pivot: the last token
    kept = dart_select(hidden, keys, slice(2, 10), n_keep=3, pivot_image=1, pivot_text=1).tolist()
    assert len(kept) == 3 and kept[:2] == [0, 3] or kept[:2] == [0, 5]
    assert 0 in kept and 5 in kept and ({3, 7} & set(kept))  # pivot, least like it (c), least like the text pivot (b)
    assert not {1, 2, 4, 6} & set(kept)  # the near-duplicates of the pivot are dropped
    # the budget is exact whatever the number of pivots
    for n_keep in (2, 4, 5, 8):
        assert len(dart_select(hidden, keys, slice(2, 10), n_keep, pivot_image=1, pivot_text=1)) == n_keep
    method = METHODS.get("dart", "vlm").cls(n_keep=3, pivot_image_token=1, pivot_text_token=1)
    ctx = LLMContext(layer=2, hidden=hidden.unsqueeze(0), visual_start=2, n_visual=8, n_keep=3,
                     norm=torch.nn.Identity(), prev_keys=keys.view(1, 12, 1, 4).transpose(1, 2))
    assert method.select(ctx)[0].tolist() == kept


def test_gpu_benchmark_script_quick_mode(tmp_path) -> None:
    """`python -m tokenbench.perf.vlm_prefill --device cpu --quick` runs end to end and writes its tables."""
    import json

    from tokenbench.perf import vlm_prefill

    out = tmp_path / "vlm"
    assert vlm_prefill.main(["--device", "cpu", "--quick", "--budgets", "8", "--methods", "fastv,visionzip",
                             "--repeats", "1", "--warmup", "0", "--decode-steps", "2", "--out", str(out)]) == 0
    result = json.loads((out / "vlm_prefill.json").read_text())
    kept = {p["method"]: p["visual_tokens_kept"] for p in result["points"]}
    assert kept == {"none": 64, "fastv": 8, "visionzip": 8}
    text = result["prompt_tokens"] - result["visual_tokens"]
    fastv = next(p for p in result["points"] if p["method"] == "fastv")
    assert fastv["lm_tokens"] == [text + 64] * 2 + [text + 8] * 2  # counted at the decoder layers
    assert "| visionzip | 8 |" in (out / "vlm_prefill.md").read_text()


def test_models_and_shared_names_resolve_to_the_vlm_family() -> None:
    from tokenbench.models.llava import Llava
    from tokenbench.registry import check_compatible

    assert check_compatible("random", "tiny-llava", "vqa") == "vlm"
    assert check_compatible("none", "llava", "vqa") == "vlm"
    with pytest.raises(IncompatibleError):
        check_compatible("fastv", "tiny-llama", "niah")
    with pytest.raises(TokenbenchError, match="llava: cannot load 'no-such/llava'"):
        Llava(pretrained="no-such/llava", device="cpu").load()  # offline in the tests: one line, no hang
    with pytest.raises(TokenbenchError, match="attn_implementation"):
        Llava(attn_implementation="flash")


def test_llava_next_runs_the_in_llm_methods_and_refuses_the_others(sample) -> None:
    """LLaVA-NeXT (any-resolution tiles, newline tokens): none/fastv/dart keep transformers' logits at keep-all
    and prune exactly their budget after layer K; vision-stage methods say why they do not apply."""
    nxt = TinyLlava(architecture="llava_next").load()
    assert type(nxt.model).__name__ == "LlavaNextForConditionalGeneration"
    chelsea = Sample(id="chelsea", question="What animal is this?", max_new_tokens=3)
    chelsea.image = "skimage:chelsea"  # 451 x 300: several tiles
    inputs = VLMRunner(nxt).build_inputs(chelsea)
    n_visual = int((inputs["input_ids"] == nxt.model.config.image_token_id).sum())
    assert n_visual > 2 * N_VISUAL and "image_sizes" in inputs
    with torch.inference_mode():
        ref = nxt.model(input_ids=inputs["input_ids"], pixel_values=inputs["pixel_values"],
                        image_sizes=inputs["image_sizes"]).logits[:, -1].float()
    n_text = int(inputs["input_ids"].shape[1]) - n_visual
    for name in ("none", "fastv", "dart"):
        logits, stats = VLMRunner(nxt, METHODS.get(name, "vlm").cls()).prefill_logits(inputs)
        torch.testing.assert_close(logits, ref, atol=1e-5, rtol=1e-5)
        assert stats["visual_tokens_in"] == n_visual
        if name != "none":
            runner = VLMRunner(nxt, METHODS.get(name, "vlm").cls(n_keep=40))
            seen, (_, stats) = layer_tokens(nxt.model, lambda r=runner: r.prefill_logits(inputs))
            assert seen == [n_text + n_visual] * 2 + [n_text + 40] * 2 and stats["visual_tokens_kept"] == 40
            assert 1 <= runner.run(chelsea).n_generated <= 3
    for name in ("fastervlm", "visionzip", "random"):
        with pytest.raises(IncompatibleError, match="LLaVA-NeXT"):
            VLMRunner(nxt, METHODS.get(name, "vlm").cls(n_keep=40))
