"""ImageNet-1k validation (or any ImageFolder-style classification set): top-1 / top-5 accuracy.

Data, in the order tried:

- ``root``: an ImageFolder directory — one sub-folder per class, images inside (``.jpg``, ``.jpeg``, ``.png``,
  ``.bmp``, ``.webp``, ``.tif``, ``.tiff``, ``.ppm``, ``.gif``, any case); class indices are the sorted folder
  names (torchvision's ``ImageFolder`` convention, so an ImageNet val folder of WordNet ids maps to the
  standard 1000-class order). Any classification set laid out this way works;
- otherwise the Hugging Face dataset ``hf_dataset`` (default ``imagenet-1k``, split ``validation``) through
  ``datasets.load_dataset`` (gated on the hub: log in and accept its terms first).

Preprocessing is the model's own timm data config (``timm.data.create_transform`` with its input size,
interpolation, ``crop_pct`` and crop mode, as timm's ``validate.py``), stopping at ``uint8`` tensors; the
runner normalises with the config's mean/std on the device. ``limit`` keeps the first N samples of a
class-interleaved order (one image of each class, then the second of each, ...) so that a subset covers many
classes. ``preload`` decodes every selected image once before the run (what the harness-overhead figure
assumes: data already decoded).

Per sample: ``top1`` and ``top5`` (0/1); the prediction is the model's top-5 class indices.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Optional

from tokenbench.errors import TokenbenchError
from tokenbench.registry import register_task
from tokenbench.task import Sample, Task

if TYPE_CHECKING:
    import torch

    from tokenbench.models.base import LoadedModel

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".ppm", ".gif")


def _positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def interleave_by_class(items: list[tuple[Any, int]]) -> list[tuple[Any, int]]:
    """Reorder ``(item, label)`` pairs round-robin over labels (stable within a label)."""
    rank: dict[int, int] = {}
    keyed = []
    for pos, (item, label) in enumerate(items):
        k = rank.get(label, 0)
        rank[label] = k + 1
        keyed.append((k, label, pos, item))
    keyed.sort(key=lambda t: (t[0], t[1], t[2]))
    return [(item, label) for _, label, _, item in keyed]


@register_task("imagenet")
@dataclass
class ImageClassification(Task):
    """Top-1/top-5 classification accuracy on ImageNet-1k validation or any ImageFolder directory."""

    families: ClassVar[tuple[str, ...]] = ("vit",)

    root: Optional[str] = None  # ImageFolder directory (one sub-folder per class); None: the HF dataset
    hf_dataset: str = "imagenet-1k"  # Hugging Face dataset id, used when root is None
    split: str = "validation"  # Hugging Face split
    limit: Optional[int] = None  # keep the first N samples of the class-interleaved order
    batch_size: int = 64  # images per forward (throughput depends on it)
    workers: int = 8  # threads decoding and resizing images
    preload: bool = False  # decode every selected image before the run

    def __post_init__(self) -> None:
        if self.limit is not None and not _positive_int(self.limit):
            raise TokenbenchError(f"imagenet: limit must be a positive integer or None, got {self.limit!r}")
        if not _positive_int(self.batch_size):
            raise TokenbenchError(f"imagenet: batch_size must be a positive integer, got {self.batch_size!r}")
        if isinstance(self.workers, bool) or not isinstance(self.workers, int) or self.workers < 0:
            raise TokenbenchError(f"imagenet: workers must be an integer >= 0, got {self.workers!r}")
        self._transform: Any = None
        self._cache: Optional[torch.Tensor] = None
        self._index: dict[str, int] = {}
        self._dataset: Any = None
        if self.root is not None:
            self._folder()  # path checks now, before any model loads

    # --- data ----------------------------------------------------------------------------------------

    def _folder(self) -> tuple[list[str], list[tuple[Path, int]]]:
        root = Path(str(self.root)).expanduser()
        if not root.exists():
            raise TokenbenchError(f"imagenet: image folder not found: {root}")
        if not root.is_dir():
            raise TokenbenchError(f"imagenet: root is not a folder: {root}")
        classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
        if not classes:
            raise TokenbenchError(
                f"imagenet: {root} has no class sub-folders (expected root/<class>/<image>)"
            )
        items = []
        for label, name in enumerate(classes):
            for path in sorted((root / name).rglob("*")):
                if path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES:
                    items.append((path, label))
        if not items:
            raise TokenbenchError(f"imagenet: no images ({', '.join(IMAGE_SUFFIXES)}) under {root}")
        return classes, items

    def _hf(self) -> Any:
        if self._dataset is None:
            try:
                import datasets
            except ImportError:
                raise TokenbenchError(
                    "imagenet: root is not set and the 'datasets' package is missing; "
                    "pass task.root=<ImageFolder dir> or pip install datasets"
                ) from None
            try:
                self._dataset = datasets.load_dataset(self.hf_dataset, split=self.split)
            except Exception as exc:
                first = str(exc).splitlines()[0] if str(exc) else ""
                raise TokenbenchError(
                    f"imagenet: could not load the Hugging Face dataset '{self.hf_dataset}' "
                    f"({type(exc).__name__}: {first}); without a hub, pass "
                    "task.root=<ImageFolder dir>"
                ) from None
        return self._dataset

    def samples(self, loaded: LoadedModel) -> list[Sample]:
        from timm.data import create_transform

        cfg = dict((loaded.info or {}).get("data_config") or {})
        if not cfg:
            raise TokenbenchError("imagenet: the model entry gives no data config (input size, mean/std)")
        self._transform = create_transform(**cfg, is_training=False, use_prefetcher=True)
        if self.root is not None:
            classes, items = self._folder()
            root = Path(str(self.root)).expanduser()
            pairs = [(str(path.relative_to(root)), label) for path, label in items]
            origin = "folder"
        else:
            ds = self._hf()
            names = getattr(ds.features.get("label"), "names", None) if hasattr(ds, "features") else None
            labels = ds["label"]
            classes = list(names) if names else sorted({int(x) for x in labels})
            pairs = [(f"{self.split}/{i:06d}", int(label)) for i, label in enumerate(labels)]
            origin = "hf"
        pairs = interleave_by_class(pairs)
        if self.limit is not None:
            pairs = pairs[: self.limit]
        n_classes = int((loaded.info or {}).get("num_classes") or 0)
        top = max(label for _, label in pairs)
        if n_classes and top >= n_classes:
            raise TokenbenchError(
                f"imagenet: the data has class index {top} but the model has {n_classes} classes"
            )
        out = [
            Sample(
                id=key,
                answer=label,
                meta={
                    "label": label,
                    "class": str(classes[label]) if label < len(classes) else str(label),
                    "source": origin,
                },
            )
            for key, label in pairs
        ]
        self._index = {s.id: i for i, s in enumerate(out)}
        self._cache = None
        if self.preload:
            self._cache = self._decode(out)
        return out

    def _open(self, sample: Sample) -> Any:
        from PIL import Image

        if sample.meta.get("source") == "hf":
            img = self._hf()[int(sample.id.rsplit("/", 1)[1])]["image"]
        else:
            with open(Path(str(self.root)).expanduser() / sample.id, "rb") as f:
                img = Image.open(f)
                img.load()
        return img.convert("RGB")

    def _decode(self, samples: list[Sample]) -> torch.Tensor:
        import torch

        if self._transform is None:
            raise RuntimeError("call samples() first")
        one = lambda s: self._transform(self._open(s))  # noqa: E731
        if self.workers > 1 and len(samples) > 1:
            with ThreadPoolExecutor(self.workers) as pool:
                images = list(pool.map(one, samples))
        else:
            images = [one(s) for s in samples]
        return torch.stack(images)

    def images(self, samples: list[Sample]) -> torch.Tensor:
        """``uint8`` images ``(B, 3, H, W)``, resized and cropped per the model's data config."""
        import torch

        if self._cache is not None:
            idx = [self._index[s.id] for s in samples]
            if idx and idx == list(range(idx[0], idx[0] + len(idx))):
                return self._cache[idx[0]:idx[0] + len(idx)]  # consecutive samples: a view, no copy
            return self._cache.index_select(0, torch.tensor(idx))
        return self._decode(samples)

    def pin_memory(self) -> None:
        """Move the preloaded images to pinned host memory (once): chunks are then views that upload to a GPU
        without a host copy (at ~20k images/s a per-chunk copy and pin kept ViT-S/16's loop waiting)."""
        import torch

        if self._cache is not None and torch.cuda.is_available() and not self._cache.is_pinned():
            self._cache = self._cache.pin_memory()

    # --- scoring -------------------------------------------------------------------------------------

    def score(self, sample: Sample, prediction: Any) -> dict[str, float]:
        if isinstance(prediction, (str, int)):
            prediction = [prediction]  # a single predicted class
        preds = [int(p) for p in (prediction or [])]
        label = int(sample.answer)
        return {"top1": float(bool(preds) and preds[0] == label), "top5": float(label in preds[:5])}
