"""tokenbench's Hydra launcher plugin: hydra-submitit-launcher, with the sweep points that share a model run
one after another inside one SLURM job, so the model is loaded once per job instead of once per point.

    tokenbench -m hydra/launcher=slurm_grouped method=streaming_llm,random method.keep_ratio=0.25,0.5

Installed as ``hydra_plugins.tokenbench_launcher`` (from ``slurm/launcher/``). Hydra finds launcher plugins by
scanning the ``hydra_plugins`` namespace on disk, which an editable install (``pip install -e .``, whose
packages are served by an import hook) does not expose; a regular install does. ``register()`` makes the
launcher and its configs known either way, and ``tokenbench``'s entry point calls it before Hydra starts.
"""

from __future__ import annotations

from .grouped import (
    GroupedLocalLauncher,
    GroupedSlurmLauncher,
    TokenbenchLocalConf,
    TokenbenchSlurmConf,
    group_points,
    model_overrides,
    store_configs,
)

__all__ = [
    "GroupedLocalLauncher",
    "GroupedSlurmLauncher",
    "TokenbenchLocalConf",
    "TokenbenchSlurmConf",
    "group_points",
    "model_overrides",
    "register",
]


def register() -> None:
    """Store the launcher configs (``hydra/launcher``: ``tokenbench_slurm``, ``tokenbench_local``) in Hydra's
    ConfigStore and register the launcher classes with Hydra's plugin registry. Idempotent and cheap; call it
    before Hydra composes the config."""
    from hydra.core.plugins import Plugins

    store_configs()
    plugins = Plugins.instance()
    for cls in (GroupedSlurmLauncher, GroupedLocalLauncher):
        plugins.register(cls)
