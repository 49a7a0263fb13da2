"""The top-level run configuration (the schema behind ``conf/config.yaml``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING


@dataclass
class MeasureSettings:
    """How latency and memory are measured (see the design's measurement protocol)."""

    warmup: int = 1  # untimed generations on the first sample before measuring
    repeats: int = 1  # timed repeats per sample; the median is recorded, the spread next to it
    fixed_output_tokens: int = 16  # time per output token is measured over this many decode steps, EOS ignored
    batch_size: int = 1  # samples generated together (kv: one left-padded batch); a task's own batch_size wins
    cuda_graph: bool = True  # on CUDA, replay decode steps from a captured CUDA graph (static-shape cache)
    fuse_kernels: bool = False  # torch.compile the decoder's elementwise glue (RMSNorm, RoPE, MLP activation)


@dataclass
class WandbSettings:
    """Weights & Biases logging. Offline by default: run files land locally for a later ``wandb sync``."""

    mode: str = "offline"  # offline | online | disabled
    project: str = "tokenbench"
    entity: Optional[str] = None
    group: Optional[str] = None  # defaults to the sweep name
    dir: Optional[str] = None  # where the wandb/ folder goes; defaults to the run directory


@dataclass
class TokenbenchConfig:
    """One run: ``model × method × task`` plus where results go and how they are measured and logged."""

    model: Any = MISSING
    method: Any = MISSING
    task: Any = MISSING
    sweep_name: str = "default"  # label grouping runs in records and W&B (set by +sweep=<preset>)
    output_dir: str = "results/runs"  # run directories are created under it, named by run key
    seed: int = 0
    progress: bool = True  # show a progress bar over samples
    measure: MeasureSettings = field(default_factory=MeasureSettings)
    wandb: WandbSettings = field(default_factory=WandbSettings)


def store_base_config() -> None:
    ConfigStore.instance().store(name="tokenbench_schema", node=TokenbenchConfig)
