"""The three registries (methods, tasks, models), in the style of timm's ``register_model``.

Registering a dataclass also stores its schema in Hydra's ConfigStore (groups ``method``, ``task``,
``model``), so ``method=streaming_llm method.window=64`` works with no YAML and with type checking.
The stored schema is a subclass of the dataclass with one extra field, ``name``, so the resolved config
says which entry it came from (and the run key hashes it).

``none`` and ``random`` are answered by every family: they may be registered once per family, and the
ConfigStore node for them holds the union of the families' fields.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib
import importlib.metadata
import logging
import pkgutil
import typing
from dataclasses import dataclass, field
from typing import Any, Callable, TypeVar

from hydra.core.config_store import ConfigStore

from tokenbench.errors import IncompatibleError, TokenbenchError

log = logging.getLogger(__name__)

FAMILIES = ("vit", "kv", "prompt", "vlm")
SHARED_METHOD_NAMES = ("none", "random")
PLUGIN_GROUP = "tokenbench.plugins"

T = TypeVar("T")


@dataclass(frozen=True)
class Entry:
    """One registered component."""

    kind: str
    name: str
    cls: type
    family: str | None = None  # methods: the family they belong to
    families: tuple[str, ...] = ()  # models and tasks: the method families they support


@dataclass
class Registry:
    """Name -> entries for one kind (``method``, ``task`` or ``model``)."""

    kind: str
    _entries: dict[str, list[Entry]] = field(default_factory=dict)

    def add(self, entry: Entry) -> None:
        existing = self._entries.setdefault(entry.name, [])
        for other in existing:
            if other.cls.__qualname__ == entry.cls.__qualname__ and other.cls.__module__ == entry.cls.__module__:
                existing.remove(other)  # re-import of the same module (e.g. importlib.reload): replace
                break
        if existing:
            shared = self.kind == "method" and entry.name in SHARED_METHOD_NAMES
            if not shared or any(e.family == entry.family for e in existing):
                where = ", ".join(f"{e.cls.__module__}.{e.cls.__qualname__}" for e in existing)
                raise TokenbenchError(f"{self.kind} '{entry.name}' is already registered by {where}")
        existing.append(entry)
        _store_schema(self.kind, entry.name, [e.cls for e in existing])

    def names(self) -> list[str]:
        return sorted(self._entries)

    def entries(self, name: str) -> list[Entry]:
        if name not in self._entries:
            raise TokenbenchError(unknown_name_message(self.kind, name, self.names()))
        return list(self._entries[name])

    def get(self, name: str, family: str | None = None) -> Entry:
        """The entry called ``name``; for ``none``/``random`` the one of ``family``."""
        entries = self.entries(name)
        if family is None or len(entries) == 1 and entries[0].family in (None, family):
            if len(entries) > 1:
                raise TokenbenchError(
                    f"{self.kind} '{name}' exists for families {sorted(e.family for e in entries)}; say which"
                )
            return entries[0]
        for e in entries:
            if e.family == family:
                return e
        raise IncompatibleError(
            f"{self.kind} '{name}' has no implementation for family '{family}' "
            f"(it has: {', '.join(sorted(str(e.family) for e in entries))})"
        )

    def __contains__(self, name: str) -> bool:
        return name in self._entries

    def family(self, family: str) -> list[type]:
        """Every class registered for a method ``family``, sorted by registered name (what the parametrized
        tests and the benchmarks iterate over, so a new method is covered the moment it registers)."""
        classes = {e.cls for entries in self._entries.values() for e in entries if e.family == family}
        return sorted(classes, key=lambda c: c.registered_name)


METHODS = Registry("method")
TASKS = Registry("task")
MODELS = Registry("model")
REGISTRIES = {"method": METHODS, "task": TASKS, "model": MODELS}


def unknown_name_message(kind: str, name: str, known: list[str]) -> str:
    close = difflib.get_close_matches(name, known, n=1, cutoff=0.5)
    hint = f" Did you mean '{close[0]}'?" if close else ""
    return f"unknown {kind} '{name}'.{hint} Registered {kind}s: {', '.join(known) or '(none)'}"


def _check_dataclass(cls: type, kind: str) -> None:
    if not dataclasses.is_dataclass(cls):
        raise TypeError(f"register_{kind} expects a dataclass, got {cls!r}")


def register_method(name: str, family: str) -> Callable[[type[T]], type[T]]:
    """Register a method dataclass under ``name`` in ``family`` (one of FAMILIES)."""
    if family not in FAMILIES:
        raise TokenbenchError(f"unknown family '{family}'; families are {', '.join(FAMILIES)}")

    def deco(cls: type[T]) -> type[T]:
        _check_dataclass(cls, "method")
        declared = getattr(cls, "family", family)
        if declared != family:
            raise TypeError(f"{cls.__name__} derives from a '{declared}' base but is registered as '{family}'")
        cls.registered_name = name  # type: ignore[attr-defined]
        METHODS.add(Entry("method", name, cls, family=family))
        return cls

    return deco


def _register_with_families(registry: Registry, name: str, default_families: tuple[str, ...]):
    """Tasks and models declare the method families they accept in a ``families`` class attribute."""

    def deco(cls: type[T]) -> type[T]:
        _check_dataclass(cls, registry.kind)
        cls.registered_name = name  # type: ignore[attr-defined]
        families = tuple(getattr(cls, "families", default_families))
        unknown = [f for f in families if f not in FAMILIES]
        if unknown:
            raise TokenbenchError(f"{registry.kind} '{name}' declares unknown families {unknown}")
        registry.add(Entry(registry.kind, name, cls, families=families))
        return cls

    return deco


def register_task(name: str) -> Callable[[type[T]], type[T]]:
    """Register a task dataclass; its class attribute ``families`` lists the method families it evaluates."""
    return _register_with_families(TASKS, name, FAMILIES)


def register_model(name: str) -> Callable[[type[T]], type[T]]:
    """Register a model dataclass; its class attribute ``families`` lists the method families it supports."""
    return _register_with_families(MODELS, name, ())


# --- ConfigStore -------------------------------------------------------------------------------------


def _schema(kind: str, name: str, classes: list[type]) -> type:
    """A dataclass with ``name`` plus the fields of ``classes`` (one class, or the union for shared names)."""
    seen: dict[str, Any] = {}
    specs: list[tuple[str, Any, Any]] = [("name", str, field(default=name))]
    for cls in classes:
        # Resolve string annotations (``from __future__ import annotations``) in the class's own module, so
        # the schema built here holds real types whatever style each file uses.
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if not f.init or f.name.startswith("_") or f.name == "name":
                continue
            ftype = hints.get(f.name, f.type)
            if f.name in seen:
                if seen[f.name] != ftype:
                    raise TypeError(f"{kind} '{name}': field '{f.name}' has different types across families")
                continue
            seen[f.name] = ftype
            if f.default is not dataclasses.MISSING:
                default = field(default=f.default)
            elif f.default_factory is not dataclasses.MISSING:
                default = field(default_factory=f.default_factory)
            else:
                default = field(default=dataclasses.MISSING)
            specs.append((f.name, ftype, default))
    # Fields without defaults must come first in a dataclass; Hydra sees them as '???' (mandatory).
    specs = [specs[0]] + sorted(specs[1:], key=lambda s: s[2].default is not dataclasses.MISSING
                                or s[2].default_factory is not dataclasses.MISSING)
    module = classes[0].__module__
    cls_name = f"{classes[0].__name__}Config" if len(classes) == 1 else f"{name.title()}Config"
    return dataclasses.make_dataclass(cls_name, specs, namespace={"__module__": module})


def _store_schema(kind: str, name: str, classes: list[type]) -> None:
    ConfigStore.instance().store(group=kind, name=name, node=_schema(kind, name, classes))


# --- discovery -------------------------------------------------------------------------------------

_loaded = False


def _import_all(package: str) -> None:
    pkg = importlib.import_module(package)
    for info in pkgutil.iter_modules(pkg.__path__):
        if not info.name.startswith("_"):
            importlib.import_module(f"{package}.{info.name}")


def load_plugins() -> list[str]:
    """Import every module named in the ``tokenbench.plugins`` entry-point group; returns their names."""
    loaded = []
    for ep in importlib.metadata.entry_points(group=PLUGIN_GROUP):
        try:
            obj = ep.load()
        except Exception as exc:  # a broken plugin must not take the harness down
            log.warning("tokenbench plugin %s (%s) failed to load: %s", ep.name, ep.value, exc)
            continue
        if callable(obj) and not isinstance(obj, type):
            obj()  # a plugin may expose a function that registers its components
        loaded.append(ep.name)
    return loaded


def load_all(force: bool = False) -> None:
    """Register the built-in models, methods and tasks, then plugins. Idempotent."""
    global _loaded
    if _loaded and not force:
        return
    _loaded = True
    for package in ("tokenbench.models", "tokenbench.methods", "tokenbench.tasks"):
        _import_all(package)
    load_plugins()


# --- building components from resolved config -------------------------------------------------------


def build(kind: str, node: Any, family: str | None = None) -> Any:
    """Instantiate the dataclass behind a resolved config node (DictConfig or dict with ``name``).

    Validation in the dataclass's ``__post_init__`` runs here, before any model is loaded.
    """
    from omegaconf import DictConfig, OmegaConf

    values = OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else dict(node)
    name = values.pop("name")
    entry = REGISTRIES[kind].get(name, family)
    own = {f.name for f in dataclasses.fields(entry.cls) if f.init}
    # The stored ConfigStore node holds the defaults of every field the name answers to (for none/random,
    # the union over families): a value of another family's field is fine only at its default.
    schema_defaults = OmegaConf.to_container(ConfigStore.instance().repo[kind][f"{name}.yaml"].node)
    foreign = {k: v for k, v in values.items() if k not in own}
    for k, v in foreign.items():
        if v != schema_defaults.get(k):
            where = f" for family '{entry.family}'" if entry.family else ""
            raise TokenbenchError(f"{kind} '{name}'{where} has no parameter '{k}'")
    return entry.cls(**{k: v for k, v in values.items() if k in own})


def key_fields(kind: str, values: dict[str, Any], family: str | None = None) -> dict[str, Any]:
    """The config values that identify a run: fields marked ``metadata={"run_key": False}`` (paths of
    caches, say, that cannot change a result) are left out of the run key."""
    entry = REGISTRIES[kind].get(values["name"], family)
    skip = {f.name for f in dataclasses.fields(entry.cls) if f.metadata.get("run_key") is False}
    return {k: v for k, v in values.items() if k not in skip}


def check_compatible(method_name: str, model_name: str, task_name: str) -> str:
    """Check method family vs model and task before loading anything; returns the method family."""
    model = MODELS.get(model_name)
    task = TASKS.get(task_name)
    method_entries = METHODS.entries(method_name)
    families = [e.family for e in method_entries]
    # a shared name (none/random) resolves to the first of the *model's* families that fits (an LM lists kv
    # before prompt), whatever order the method modules were imported in
    usable = [f for f in model.families if f in families and f in task.families]
    if usable:
        return usable[0]
    works = [
        m for m in METHODS.names()
        if any(e.family in model.families and e.family in task.families for e in METHODS.entries(m))
    ]
    raise IncompatibleError(
        f"method '{method_name}' (family {'/'.join(map(str, families))}) does not fit model '{model_name}' "
        f"(families {', '.join(model.families) or 'none'}) with task '{task_name}' "
        f"(families {', '.join(task.families)}). Methods that work here: {', '.join(works) or 'none'}"
    )
