"""Prompt family: every registered prompt method is checked automatically (keep-all is a no-op, the budget in
target tokens is respected within one unit, the question reaches the target verbatim, the achieved ratio is
recorded, same seed same output, bad budgets fail with one line, compression time inside the end-to-end
time), plus the methods' rules on hand-built inputs against direct computations, the runner end to end and the
resolution of the shared names ``none``/``random``."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest
import torch
from hydra import compose, initialize_config_dir
from tokenbench import registry
from tokenbench.cli import CONF_DIR
from tokenbench.config import MeasureSettings, store_base_config
from tokenbench.errors import TokenbenchError
from tokenbench.families.prompt import LMCompressor, PromptCompressor, sentences, words
from tokenbench.models.tiny import TinyLlama, tiny_tokenizer
from tokenbench.prompt_runner import PromptRunner
from tokenbench.registry import METHODS, load_all
from tokenbench.task import Sample
from tokenbench.tasks.niah import NeedleInAHaystack

load_all()

PROMPT_METHODS = METHODS.family("prompt")
IDS = [c.registered_name for c in PROMPT_METHODS]
BUDGETED = [c for c in PROMPT_METHODS if c.takes_budget]
BIDS = [c.registered_name for c in BUDGETED]

CONTEXT = ("The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again.\n\n" * 3
           + "The special magic number is 7192846. What is the best thing to do in San Francisco? "
           "Eat a sandwich and sit in Dolores Park on a sunny day.\n\n" * 2
           + "There and back again. The sun is yellow. Here we go.")
QUESTION = "\n\nWhat is the special magic number mentioned in the text above?"


@pytest.fixture(scope="module")
def loaded():
    return TinyLlama(num_hidden_layers=2).load()


def save_tiny_classifier(path: Path, tok: Any, max_positions: int) -> str:
    """A tiny random token-classification checkpoint (BERT, 2 labels, seeded) over ``tok``, saved to ``path``:
    llmlingua2's published compressor is a hub id, unreachable here."""
    from transformers import BertConfig, BertForTokenClassification

    cfg = BertConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                     intermediate_size=64, num_labels=2, max_position_embeddings=max_positions)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        BertForTokenClassification(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def classifier_dir(tmp_path_factory) -> str:
    """The tiny classifier with a locally built tokenizer."""
    return save_tiny_classifier(tmp_path_factory.mktemp("llmlingua2-tiny"), tiny_tokenizer(), 128)


def init_fields(cls: type) -> set[str]:
    return {f.name for f in dataclasses.fields(cls) if f.init}


def make(cls: type, classifier: str = "", **kw) -> PromptCompressor:
    """An instance with the test's compressor: the target itself (tiny-llama) or the tiny classifier."""
    fields = init_fields(cls)
    extra = {"compressor": "target"} if "compressor" in fields else {}
    if "model_path" in fields:
        extra["model_path"] = classifier
    if "max_seq_len" in fields:
        extra["max_seq_len"] = 48  # several chunks on CONTEXT
    extra.update({k: v for k, v in kw.items() if k in fields})
    return cls(**extra)


@pytest.fixture
def build(loaded, classifier_dir):
    def _build(cls: type, **kw) -> PromptCompressor:
        m = make(cls, classifier_dir, **kw)
        m.prepare(loaded)
        return m
    return _build


def count(loaded, text: str) -> int:
    return len(loaded.tokenizer(text, add_special_tokens=False)["input_ids"])


# --- every registered method -------------------------------------------------------------------------------


def test_every_family_method_is_collected() -> None:
    assert {"none", "prompt_none", "random", "prompt_random", "truncate", "selective_context", "llmlingua",
            "llmlingua2"} <= set(IDS)


@pytest.mark.parametrize("cls", PROMPT_METHODS, ids=IDS)
def test_keep_all_is_a_noop(cls, build, loaded) -> None:
    m = build(cls)
    assert m.is_noop()
    c = m.compress(CONTEXT, QUESTION)
    assert c.context == CONTEXT and c.keep_ratio == 1.0
    if cls.takes_budget:  # an absolute budget at or above the context's size keeps everything too
        c = build(cls, target_tokens=count(loaded, CONTEXT)).compress(CONTEXT, QUESTION)
        assert c.context == CONTEXT


@pytest.mark.parametrize("budget", [{"keep_ratio": 0.5}, {"keep_ratio": 0.25}, {"target_tokens": 40}],
                         ids=["r0.5", "r0.25", "t40"])
@pytest.mark.parametrize("cls", BUDGETED, ids=BIDS)
def test_budget_respected_within_one_unit(cls, budget, build, loaded) -> None:
    """Never above the budget; below it by at most the largest unit the method could not fit (a word, a
    sentence, a token) plus one token for a merge at a join."""
    n = count(loaded, CONTEXT)
    c = build(cls, **budget).compress(CONTEXT, QUESTION)
    expected = budget.get("target_tokens") or round(budget["keep_ratio"] * n)
    assert c.budget_tokens == expected and c.original_tokens == n
    assert c.compressed_tokens == count(loaded, c.context)  # counted with the target tokenizer
    assert c.compressed_tokens <= c.budget_tokens
    assert c.compressed_tokens >= c.budget_tokens - c.unit_tokens - 1, (c.compressed_tokens, c.unit_tokens)
    assert c.keep_ratio == pytest.approx(c.compressed_tokens / n)


@pytest.mark.parametrize("cls", BUDGETED, ids=BIDS)
def test_same_seed_same_output(cls, build) -> None:
    a = build(cls, keep_ratio=0.4).compress(CONTEXT, QUESTION)
    b = build(cls, keep_ratio=0.4).compress(CONTEXT, QUESTION)
    assert a.context == b.context


@pytest.mark.parametrize("cls", PROMPT_METHODS, ids=IDS)
def test_bad_budgets_fail_with_one_line(cls) -> None:
    bad = [{"keep_ratio": 0.0}, {"keep_ratio": 1.5}, {"keep_ratio": -0.2}, {"target_tokens": 0},
           {"target_tokens": 2.5}, {"keep_ratio": 0.5, "target_tokens": 10}]
    for kw in bad:
        with pytest.raises(TokenbenchError) as err:
            make(cls, "x", **kw)
        assert "\n" not in str(err.value) and cls.registered_name in str(err.value)
    if not cls.takes_budget:
        with pytest.raises(TokenbenchError, match="no budget"):
            make(cls, "x", keep_ratio=0.5)


@pytest.mark.parametrize("cls", BUDGETED, ids=BIDS)
def test_protected_instruction_is_kept_and_not_counted(cls, build, loaded) -> None:
    instruction = "Answer the question based on the text.\n\n"
    c = build(cls, keep_ratio=0.5).compress(instruction + CONTEXT, QUESTION, protect_prefix=len(instruction))
    assert c.context.startswith(instruction)
    assert c.original_tokens == count(loaded, CONTEXT)
    assert c.compressed_tokens == count(loaded, c.context[len(instruction):]) <= c.budget_tokens


@pytest.fixture(scope="module")
def niah_sample(loaded) -> Sample:
    return NeedleInAHaystack(context_lengths=[160], depths=[0.5], max_new_tokens=4).samples(loaded)[0]


@pytest.mark.parametrize("cls", PROMPT_METHODS, ids=IDS)
def test_runner_question_verbatim_ratio_recorded_compress_inside_e2e(cls, loaded, classifier_dir,
                                                                     niah_sample) -> None:
    m = make(cls, classifier_dir, **({"keep_ratio": 0.5} if cls.takes_budget else {}))
    runner = PromptRunner(loaded, m, MeasureSettings(warmup=0, fixed_output_tokens=4))
    out = runner.run(niah_sample, use_chat_template=True)
    prompt = runner.lm.build_prompt(runner.last_sample, use_chat_template=True)
    assert niah_sample.question in prompt.text
    assert loaded.tokenizer.decode(prompt.suffix_ids[0]).startswith(niah_sample.question)
    comp = out.compression
    n = count(loaded, niah_sample.context)
    assert comp["original_tokens"] == n
    assert comp["achieved_keep_ratio"] == pytest.approx(comp["compressed_tokens"] / n)
    if cls.takes_budget:
        assert comp["compressed_tokens"] <= comp["budget_tokens"] == round(0.5 * n)
        assert comp["achieved_keep_ratio"] < 0.55
    else:
        assert comp["achieved_keep_ratio"] == 1.0 and runner.last_sample.context == niah_sample.context
    lat = out.latency
    assert lat["compress_ms"] >= 0
    assert lat["e2e_ms"] == pytest.approx(lat["compress_ms"] + lat["generate_e2e_ms"])
    assert lat["ttft_ms"] == pytest.approx(lat["compress_ms"] + lat["generate_ttft_ms"])
    assert lat["e2e_ms"] >= lat["compress_ms"] and lat["prefill_ms"] > 0
    assert "compressor_weights_bytes" in out.memory


def test_compression_time_is_measured_inside_e2e(loaded, niah_sample) -> None:
    """A compressor that sleeps 50 ms: the sleep shows in compress_ms and in e2e_ms."""
    import time

    cls = METHODS.get("truncate").cls

    class Slow(cls):
        def select(self, body, question, budget):
            time.sleep(0.05)
            return super().select(body, question, budget)

    out = PromptRunner(loaded, Slow(keep_ratio=0.5), MeasureSettings(warmup=0, fixed_output_tokens=2)).run(niah_sample)
    assert out.latency["compress_ms"] >= 50
    assert out.latency["e2e_ms"] >= 50 + out.latency["generate_e2e_ms"] - 1e-6


# --- registry, config and the pipeline ---------------------------------------------------------------------


def test_shared_names_resolve_to_kv_on_an_lm_and_prompt_names_to_prompt() -> None:
    for model in ("hf-causal-lm", "smollm2-135m", "tiny-llama"):
        for task in ("niah", "longbench"):
            assert registry.check_compatible("none", model, task) == "kv"
            assert registry.check_compatible("random", model, task) == "kv"
            for name in ("prompt_none", "prompt_random", "truncate", "selective_context", "llmlingua",
                         "llmlingua2"):
                assert registry.check_compatible(name, model, task) == "prompt"
    assert METHODS.get("random", "prompt").cls.family == "prompt"
    assert METHODS.get("none", "prompt").cls.family == "prompt"
    assert METHODS.get("none", "kv").cls.family == "kv"


def _cfg(tmp_path: Path, *overrides: str):
    store_base_config()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose(config_name="config", overrides=[
            "model=tiny-llama", f"output_dir={tmp_path}", "wandb.mode=disabled", "task.context_lengths=[160]",
            "task.depths=[0.0,1.0]", "task.max_new_tokens=4", "measure.warmup=0",
            "measure.fixed_output_tokens=4", *overrides])


def test_plan_builds_prompt_methods_from_hydra_overrides(tmp_path) -> None:
    from tokenbench.run import plan

    p = plan(_cfg(tmp_path, "method=selective_context", "method.keep_ratio=0.5", "method.unit=sentence"))
    assert p.family == "prompt" and p.method.keep_ratio == 0.5 and p.method.unit == "sentence"
    p = plan(_cfg(tmp_path, "method=none"))
    assert p.family == "kv"
    p = plan(_cfg(tmp_path, "method=prompt_random", "method.target_tokens=50"))
    assert p.family == "prompt" and p.method.target_tokens == 50
    keys = {plan(_cfg(tmp_path, "method=truncate", "method.keep_ratio=0.5", f"method.drop={d}")).key
            for d in ("head", "tail", "middle")}
    assert len(keys) == 3
    with pytest.raises(TokenbenchError, match="keep_ratio"):
        plan(_cfg(tmp_path, "method=llmlingua", "method.keep_ratio=1.5"))


def test_pipeline_end_to_end_with_a_reused_compressor(tmp_path) -> None:
    from tokenbench.run import execute, plan

    rec = execute(plan(_cfg(tmp_path, "method=selective_context", "method.keep_ratio=0.5",
                            "method.compressor=tiny-llama")), progress=False)
    assert rec.status == "ok" and rec.family == "prompt" and rec.n_samples == 2
    assert rec.budget == {"keep_ratio": 0.5, "target_tokens": None}
    assert 0.4 < rec.achieved_keep_ratio <= 0.5
    for k in ("compress_ms", "prefill_ms", "ttft_ms", "tpot_ms", "e2e_ms", "decode_ms"):
        assert rec.latency[k] is not None
    assert rec.latency["e2e_ms"] >= rec.latency["compress_ms"]
    # the compressor names the model the run loaded (same config): it is reused, not loaded again
    assert rec.extra["compressor_weights_bytes"] == 0 and rec.extra["compressor"] == "tiny-llama"


def test_compressor_on_its_own_is_loaded_once_and_shared(loaded) -> None:
    from tokenbench.families import prompt as fam

    cls = METHODS.get("selective_context").cls
    a, b = cls(keep_ratio=0.5, compressor="tiny-llama", compressor_device="cpu"), cls(keep_ratio=0.3,
                                                                                        compressor="tiny-llama")
    a.prepare(loaded)
    b.prepare(loaded)
    assert a.lm is b.lm and a.lm is not loaded and a.lm.device == "cpu"
    assert ("tiny-llama", "cpu") in fam._COMPRESSORS
    with pytest.raises(TokenbenchError, match="compressor_device"):
        cls(keep_ratio=0.5, compressor_device="tpu")


# --- method rules on hand-built inputs -----------------------------------------------------------------------


def test_segmentation_pieces_concatenate_to_the_text() -> None:
    for text in (CONTEXT, "  lead and trail  \n", "one", "", "A. B!  C?\n\nD"):
        assert "".join(words(text)) == text
        assert "".join(sentences(text)) == text
    assert sentences("A b. C d!\n\nE f") == ["A b.", " C d!", "\n\nE f"]


@pytest.mark.parametrize("drop", ["head", "tail", "middle"])
def test_truncate_keeps_exactly_the_right_tokens(drop, build, loaded) -> None:
    tok = loaded.tokenizer
    ids = tok(CONTEXT, add_special_tokens=False)["input_ids"]
    b = 37
    c = build(METHODS.get("truncate").cls, target_tokens=b, drop=drop).compress(CONTEXT)
    dec = lambda x: tok.decode(x, clean_up_tokenization_spaces=False)
    expected = {"tail": dec(ids[:b]), "head": dec(ids[-b:]), "middle": dec(ids[:b // 2]) + dec(ids[-(b - b // 2):])}
    assert c.context == expected[drop]
    assert c.compressed_tokens == b


def _greedy(counts: list[int], scores: list[float], budget: int) -> list[bool]:
    keep, total = [False] * len(counts), 0
    for i in sorted(range(len(counts)), key=lambda j: (-scores[j], j)):
        if total + counts[i] <= budget:
            keep[i], total = True, total + counts[i]
    return keep


@pytest.mark.parametrize("unit", ["sentence", "word"])
def test_selective_context_drops_the_least_self_informative_units(unit, build, loaded) -> None:
    """Self-information computed here directly (each sentence alone after BOS, -log p, mean per unit): the
    kept units are the most informative ones that fit the budget."""
    m = build(METHODS.get("selective_context").cls, keep_ratio=0.5, unit=unit)
    tok, model = loaded.tokenizer, loaded.model
    units = sentences(CONTEXT) if unit == "sentence" else words(CONTEXT)
    unit_of_char = []
    for i, u in enumerate(units):
        unit_of_char += [i] * len(u)
    sums, ns = [0.0] * len(units), [0] * len(units)
    pos = 0
    for sent in sentences(CONTEXT):
        enc = tok(sent, add_special_tokens=False, return_offsets_mapping=True)
        x = torch.tensor([[tok.bos_token_id, *enc["input_ids"]]])
        with torch.no_grad():
            logp = model(input_ids=x).logits[0, :-1].float().log_softmax(-1)
        info = -logp[torch.arange(x.shape[1] - 1), x[0, 1:]]
        for (a, _), v in zip(enc["offset_mapping"], info.tolist()):
            u = unit_of_char[pos + a]
            sums[u] += v
            ns[u] += 1
        pos += len(sent)
    scores = [s / n if n else 0.0 for s, n in zip(sums, ns)]
    counts = [count(loaded, u) for u in units]
    c = m.compress(CONTEXT)
    keep = _greedy(counts, scores, c.budget_tokens)
    expected = "".join(u for u, k in zip(units, keep) if k)
    assert count(loaded, expected) <= c.budget_tokens  # the recount did not have to drop more
    assert c.context == expected
    kept = [s for s, k in zip(scores, keep) if k]
    dropped = [s for s, k in zip(scores, keep) if not k]
    assert sum(kept) / len(kept) > sum(dropped) / len(dropped)


def test_llmlingua_budget_controller_allocates_as_the_paper_says() -> None:
    """Demonstrations ranked by perplexity, highest first, each taking its tokens from budget + 100 until it
    runs below zero (the one that crosses is kept); kept in their original order."""
    from tokenbench.methods.llmlingua import budget_controller, dynamic_offsets, threshold_at

    ppl, counts = [3.0, 9.0, 1.0, 5.0, 7.0], [50, 50, 50, 50, 50]
    assert budget_controller(ppl, counts, 20 + 100) == [1, 4, 3]  # 120 -> 70 -> 20 -> -30
    assert budget_controller(ppl, counts, 300) == [1, 4, 3, 0, 2]  # never below zero: everything
    assert budget_controller(ppl, counts, 0) == [1]
    assert dynamic_offsets(3, 0.3) == pytest.approx([0.3, 0.0, -0.3])
    assert dynamic_offsets(1, 0.3) == [0.0] and dynamic_offsets(4, 0.0) == [0.0] * 4
    # the reference's threshold: rank int(n * ratio) - 1 of the losses sorted high to low; keep loss > it
    losses = [5.0, 1.0, 4.0, 2.0, 3.0, 0.5, 6.0, 7.0, 0.1, 2.5]
    assert threshold_at(losses, 0.5) == 3.0 and sum(v > 3.0 for v in losses) == 4
    assert threshold_at(losses, 0.0) == 7.0 and threshold_at(losses, 1.0) == 0.1


def test_llmlingua_coarse_stage_keeps_high_perplexity_segments_in_order(build, loaded) -> None:
    m = build(METHODS.get("llmlingua").cls, target_tokens=10, context_budget=30)
    segs = ["Alpha beta gamma delta.", "\n\nEpsilon zeta eta theta.", "\n\nIota kappa lambda mu.",
            "\n\nNu xi omicron pi."]
    ppl = dict(zip(segs, [2.0, 8.0, 1.0, 5.0]))
    m.perplexity = lambda text: ppl[text]
    counts = m.count_pieces(segs)
    kept, offsets, _ = m.coarse("".join(segs), 10)
    expected, left = [], 40
    for i in (1, 3, 0, 2):
        expected.append(i)
        left -= counts[i]
        if left < 0:
            break
    assert kept == [segs[i] for i in sorted(expected)] and offsets == [0.0] * len(kept)


def test_llmlingua_token_losses_are_conditioned_on_the_compressed_prefix(build, loaded) -> None:
    m = build(METHODS.get("llmlingua").cls, keep_ratio=0.5, iterative_size=12)
    ids = loaded.tokenizer(CONTEXT, add_special_tokens=False)["input_ids"][:36]
    keep, loss = m.iterative(ids, [0.5] * len(ids))
    assert 0 < sum(keep) < len(ids)
    bos = loaded.tokenizer.bos_token_id
    for w0 in (12, 24):  # a later window, scored directly after BOS + the kept tokens before it
        prefix = [bos] + [t for t, k in zip(ids[:w0], keep[:w0]) if k]
        x = torch.tensor([prefix + ids[w0:w0 + 12]])
        with torch.no_grad():
            logp = loaded.model(input_ids=x).logits[0].float().log_softmax(-1)
        direct = [-logp[len(prefix) - 1 + j, ids[w0 + j]].item() for j in range(12)]
        assert loss[w0:w0 + 12] == pytest.approx(direct, abs=1e-4)


def test_llmlingua2_word_probability_is_the_mean_of_its_tokens(build, loaded, classifier_dir) -> None:
    from transformers import AutoModelForTokenClassification, AutoTokenizer

    cls = METHODS.get("llmlingua2").cls
    m = build(cls, keep_ratio=0.5, max_seq_len=128)
    text = "The special magic number is 7192846. Eat a sandwich."
    pieces = words(text)
    probs = m.word_probs(pieces)
    tok = AutoTokenizer.from_pretrained(classifier_dir)
    model = AutoModelForTokenClassification.from_pretrained(classifier_dir).eval()
    enc = tok(text, return_offsets_mapping=True, return_tensors="pt")
    offsets = enc.pop("offset_mapping")[0].tolist()
    with torch.no_grad():
        p = model(**enc).logits[0].softmax(-1)[:, 1].tolist()
    starts = [sum(len(x) for x in pieces[:i]) for i in range(len(pieces))]
    for i, (a, b) in enumerate(zip(starts, starts[1:] + [len(text)])):
        own = [q for (s, e), q in zip(offsets, p) if e > s and a <= s < b]
        assert probs[i] == pytest.approx(sum(own) / len(own), abs=1e-5)
    # chunks of a small window cover every word; forced words are always kept
    m2 = build(cls, keep_ratio=0.3, max_seq_len=16, force_tokens=["7192846"])
    assert all(v > 0 for v in m2.word_probs(words(CONTEXT)))
    assert "7192846" in m2.compress(CONTEXT).context


def test_llmlingua2_missing_checkpoint_fails_with_one_line(loaded, tmp_path) -> None:
    m = METHODS.get("llmlingua2").cls(keep_ratio=0.5, model_path=str(tmp_path / "nope"))
    with pytest.raises(TokenbenchError, match="llmlingua2: cannot load") as err:
        m.prepare(loaded)
    assert "\n" not in str(err.value)


def test_random_depends_on_seed_and_context_not_on_order(build) -> None:
    cls = METHODS.get("prompt_random").cls
    a = build(cls, keep_ratio=0.5, seed=0)
    b = build(cls, keep_ratio=0.5, seed=1)
    first = a.compress(CONTEXT).context
    assert b.compress(CONTEXT).context != first
    a.compress("Some other context with a few words in it.")
    assert a.compress(CONTEXT).context == first


def test_lm_compressors_share_the_base() -> None:
    for name in ("selective_context", "llmlingua"):
        assert issubclass(METHODS.get(name).cls, LMCompressor)
