"""Registries: decorators, ConfigStore schemas with type checking, closest-match errors, family checks, plugins."""

from __future__ import annotations

import sys
import textwrap
from dataclasses import dataclass

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.config_store import ConfigStore
from hydra.errors import ConfigCompositionException
from omegaconf.errors import ConfigAttributeError, ValidationError

from tokenbench import registry
from tokenbench.cli import CONF_DIR
from tokenbench.config import store_base_config
from tokenbench.errors import IncompatibleError, TokenbenchError

registry.load_all()
store_base_config()


def _compose(*overrides: str):
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides))


def test_builtins_registered() -> None:
    assert {"none", "random", "streaming_llm"} <= set(registry.METHODS.names())
    assert "niah" in registry.TASKS.names()
    assert {"smollm2-135m", "tiny-llama", "hf-causal-lm"} <= set(registry.MODELS.names())


@pytest.mark.parametrize("kind", ["method", "task", "model"])
def test_every_entry_is_in_configstore_with_its_name(kind: str) -> None:
    repo = ConfigStore.instance().repo[kind]
    for name in registry.REGISTRIES[kind].names():
        node = repo[f"{name}.yaml"].node
        assert node["name"] == name


@pytest.mark.parametrize("family", ["kv", "vit", "vlm", "prompt"])
def test_family_lists_each_class_of_the_family_once(family: str) -> None:
    """``METHODS.family`` (what the parametrized tests iterate over): every class of the family, shared names
    included, each once, sorted by name, and nothing of another family."""
    got = registry.METHODS.family(family)
    expected = {e.cls for n in registry.METHODS.names() for e in registry.METHODS.entries(n) if e.family == family}
    assert set(got) == expected and len(got) == len(expected)
    assert [c.registered_name for c in got] == sorted(c.registered_name for c in expected)
    assert {"none", "random"} <= {c.registered_name for c in got}


def test_override_field_without_yaml_is_typed() -> None:
    cfg = _compose("model=tiny-llama", "method=streaming_llm", "method.keep_ratio=0.25", "method.n_sink=2")
    assert cfg.method.name == "streaming_llm"
    assert cfg.method.keep_ratio == 0.25 and cfg.method.n_sink == 2
    with pytest.raises(ConfigCompositionException) as err:
        _compose("method=streaming_llm", "method.keep_ratio=abc")
    assert isinstance(err.value.__cause__, ValidationError)
    with pytest.raises(ConfigCompositionException) as err:
        _compose("method=streaming_llm", "method.no_such_field=1")
    assert isinstance(err.value.__cause__, ConfigAttributeError)
    assert "no_such_field" in str(err.value.__cause__)


def test_unknown_name_lists_registered_and_closest() -> None:
    with pytest.raises(TokenbenchError) as err:
        registry.METHODS.get("streamingllm")
    msg = str(err.value)
    assert "Did you mean 'streaming_llm'?" in msg
    for name in registry.METHODS.names():
        assert name in msg
    with pytest.raises(TokenbenchError, match="unknown task 'nia'.*Did you mean 'niah'"):
        registry.TASKS.get("nia")


def test_family_mismatch_names_the_pairs_that_work() -> None:
    @dataclass
    class FakeVit:
        family = "vit"

    registry.register_method("fake_vit_only", family="vit")(FakeVit)
    try:
        with pytest.raises(IncompatibleError) as err:
            registry.check_compatible("fake_vit_only", "tiny-llama", "niah")
        msg = str(err.value)
        assert "fake_vit_only" in msg and "tiny-llama" in msg and "streaming_llm" in msg
        # none/random are answered by every family: they fit this model.
        assert registry.check_compatible("random", "tiny-llama", "niah") == "kv"
    finally:
        registry.METHODS._entries.pop("fake_vit_only")


def test_duplicate_name_rejected_but_shared_names_per_family_allowed() -> None:
    with pytest.raises(TokenbenchError, match="already registered"):
        @registry.register_method("streaming_llm", family="kv")
        @dataclass
        class Dup:
            family = "kv"

    # every family registers its own `random`: set the vlm one aside while a stand-in takes its place
    real_vlm = [e for e in registry.METHODS._entries["random"] if e.family == "vlm"]
    registry.METHODS._entries["random"] = [e for e in registry.METHODS._entries["random"] if e.family != "vlm"]

    @registry.register_method("random", family="vlm")
    @dataclass
    class RandomVLM:
        family = "vlm"
        keep_ratio: float = 1.0
        seed: int = 0
        visual_only: bool = True

    try:
        assert registry.METHODS.get("random", "vlm").cls is RandomVLM
        assert registry.METHODS.get("random", "kv").cls is not RandomVLM
        # The stored schema is the union of the families' fields.
        node = ConfigStore.instance().repo["method"]["random.yaml"].node
        assert "visual_only" in node and "seed" in node
        # A vlm-only field set on a kv run is an error, not silently ignored.
        with pytest.raises(TokenbenchError, match="no parameter 'visual_only'"):
            registry.build("method", {"name": "random", "visual_only": False}, "kv")
    finally:
        registry.METHODS._entries["random"] = [e for e in registry.METHODS._entries["random"] if e.family != "vlm"]
        registry.METHODS._entries["random"] += real_vlm
        registry._store_schema("method", "random", [e.cls for e in registry.METHODS._entries["random"]])


def test_build_runs_validation(tmp_path) -> None:
    with pytest.raises(TokenbenchError, match="keep_ratio"):
        registry.build("method", {"name": "streaming_llm", "keep_ratio": 1.5}, "kv")
    with pytest.raises(TokenbenchError, match="keep_ratio"):
        registry.build("method", {"name": "random", "keep_ratio": -0.1}, "kv")


def test_plugin_entry_point_registers(tmp_path, monkeypatch) -> None:
    """A package that declares the entry-point group `tokenbench.plugins` is picked up."""
    pkg = tmp_path / "tb_test_plugin"
    pkg.mkdir()
    (pkg / "__init__.py").write_text(textwrap.dedent("""
        from dataclasses import dataclass
        from tokenbench import register_method
        from tokenbench.families.kv import KVMethod

        @register_method("plugin_probe", family="kv")
        @dataclass
        class PluginProbe(KVMethod):
            marker: int = 7  # a parameter only this plugin has
    """))
    dist = tmp_path / "tb_test_plugin-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: tb-test-plugin\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[tokenbench.plugins]\nprobe = tb_test_plugin\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        assert "probe" in registry.load_plugins()
        assert "plugin_probe" in registry.METHODS
        node = ConfigStore.instance().repo["method"]["plugin_probe.yaml"].node
        assert node["marker"] == 7
    finally:
        registry.METHODS._entries.pop("plugin_probe", None)
        sys.modules.pop("tb_test_plugin", None)


# Image tasks need images and a vision model: tests/test_imagenet.py runs the same checks on every one of them.
TEXT_TASKS = [n for n in registry.TASKS.names() if {"kv", "prompt", "vlm"} & set(registry.TASKS.get(n).families)]


@pytest.mark.parametrize("name", TEXT_TASKS)
def test_every_task_builds_scores_and_rejects_unknown_parameters(name: str) -> None:
    """Every registered text task: default samples on the tiny tokenizer, metrics in [0, 1], a clear error for
    a parameter it does not have."""
    from tokenbench.models.base import LoadedModel
    from tokenbench.models.tiny import tiny_tokenizer

    task = registry.build("task", {"name": name})
    samples = task.samples(LoadedModel(model=None, tokenizer=tiny_tokenizer()))
    assert samples and len({s.id for s in samples}) == len(samples)
    s = samples[0]
    perfect = task.score(s, s.answer if isinstance(s.answer, str) else str(s.answer))
    wrong = task.score(s, "")
    assert perfect and set(perfect) == set(wrong)
    assert all(0.0 <= v <= 1.0 for v in [*perfect.values(), *wrong.values()])
    assert max(perfect.values()) == 1.0
    with pytest.raises(TokenbenchError, match="no parameter 'no_such_field'"):
        registry.build("task", {"name": name, "no_such_field": 1})
