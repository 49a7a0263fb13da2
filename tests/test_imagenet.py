"""The imagenet (ImageFolder) task and the vision runner: real photos from scikit-image in class folders
with labels assigned here, a tiny random ViT; samples, preprocessing, scoring, the batched loop and its
records, and an end-to-end CLI run with resume."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from tokenbench import registry
from tokenbench.config import MeasureSettings
from tokenbench.errors import TokenbenchError
from tokenbench.models.timm_vit import TinyViT
from tokenbench.task import Sample
from tokenbench.vision import VisionRunner

from test_pipeline import record, run_dirs, tokenbench

registry.load_all()

# label (folder) -> the skimage.data photos in it; sorted folder names give indices 0..4
PHOTOS = {
    "astronaut": ["astronaut"],
    "cat": ["cat", "chelsea"],
    "coffee": ["coffee"],
    "grayscale": ["camera", "coins", "moon"],
    "rocket": ["rocket"],
}
N_PHOTOS = sum(len(v) for v in PHOTOS.values())


@pytest.fixture(scope="session")
def photos(tmp_path_factory) -> Path:
    """An ImageFolder of eight real photos (RGB and grayscale, several sizes, JPEG and PNG)."""
    skdata = pytest.importorskip("skimage.data")
    from PIL import Image

    root = tmp_path_factory.mktemp("photos")
    for label, names in PHOTOS.items():
        (root / label).mkdir()
        for i, name in enumerate(names):
            suffix = ".png" if i % 2 else ".JPG"
            Image.fromarray(getattr(skdata, name)()).save(root / label / f"{name}{suffix}")
    (root / "cat" / "notes.txt").write_text("not an image")
    return root


@pytest.fixture(scope="module")
def loaded():
    return TinyViT(img_size=32, patch_size=8, depth=2, num_classes=10).load()


def build_task(**kw):
    return registry.build("task", {"name": "imagenet", **kw})


# --- the task ----------------------------------------------------------------------------------------


def test_samples_labels_and_interleaved_order(photos, loaded) -> None:
    task = build_task(root=str(photos))
    samples = task.samples(loaded)
    assert len(samples) == N_PHOTOS and len({s.id for s in samples}) == N_PHOTOS
    classes = sorted(PHOTOS)
    for s in samples:
        label, name = s.id.split("/")
        assert s.answer == classes.index(label) == s.meta["label"] and s.meta["class"] == label
        assert name.rsplit(".", 1)[0] in PHOTOS[label]
    # one image of every class first, then the second of those with more
    assert [s.answer for s in samples[:5]] == [0, 1, 2, 3, 4]
    assert [s.answer for s in samples[5:]] == [1, 3, 3]
    limited = build_task(root=str(photos), limit=3).samples(loaded)
    assert [s.id for s in limited] == [s.id for s in samples[:3]]


def test_images_follow_the_models_data_config(photos, loaded) -> None:
    """uint8 (B, 3, H, W) at the model's input size: timm's eval transform (resize shorter side to
    size / crop_pct, center crop), grayscale converted to RGB; preloaded images equal decoded ones."""
    task = build_task(root=str(photos))
    samples = task.samples(loaded)
    imgs = task.images(samples)
    assert imgs.dtype == torch.uint8 and imgs.shape == (N_PHOTOS, 3, 32, 32)
    gray = [i for i, s in enumerate(samples) if s.meta["class"] == "grayscale"]
    for i in gray:
        assert torch.equal(imgs[i, 0], imgs[i, 1]) and torch.equal(imgs[i, 1], imgs[i, 2])
    color = [i for i, s in enumerate(samples) if s.meta["class"] == "coffee"][0]
    assert not torch.equal(imgs[color, 0], imgs[color, 2])
    # the same crop by hand: shorter side to floor(32 / 0.875) = 36, bicubic, center 32 x 32
    from PIL import Image
    from torchvision.transforms import functional as TF

    with Image.open(photos / samples[color].id) as im:
        ref = TF.center_crop(TF.resize(im.convert("RGB"), 36, interpolation=TF.InterpolationMode.BICUBIC), 32)
    assert torch.equal(imgs[color], TF.pil_to_tensor(ref))
    pre = build_task(root=str(photos), preload=True)
    pre_samples = pre.samples(loaded)
    assert torch.equal(pre.images(pre_samples[2:5]), imgs[2:5])  # consecutive: a view of the cache
    shuffled = [pre_samples[i] for i in (6, 0, 3)]
    assert torch.equal(pre.images(shuffled), imgs[[6, 0, 3]])  # any other order: gathered
    pre.pin_memory()  # a no-op without CUDA; with it, the same images in pinned memory
    assert torch.equal(pre.images(pre_samples[2:5]), imgs[2:5])


def test_score_top1_top5() -> None:
    task = build_task()
    s = Sample(id="x", answer=7)
    assert task.score(s, [7, 1, 2, 3, 4]) == {"top1": 1.0, "top5": 1.0}
    assert task.score(s, [1, 2, 7, 3, 4]) == {"top1": 0.0, "top5": 1.0}
    assert task.score(s, [1, 2, 3, 4, 5]) == {"top1": 0.0, "top5": 0.0}
    assert task.score(s, [1, 2, 3, 4, 5, 7]) == {"top1": 0.0, "top5": 0.0}  # only the first five count
    assert task.score(s, "7") == {"top1": 1.0, "top5": 1.0}  # one predicted class
    assert task.aggregate(
        [{"metrics": {"top1": 1.0, "top5": 1.0}}, {"metrics": {"top1": 0.0, "top5": 1.0}}]
    ) == {"top1": 0.5, "top5": 1.0}


@pytest.mark.parametrize(
    "name", [n for n in registry.TASKS.names() if "vit" in registry.TASKS.get(n).families]
)
def test_every_image_task_builds_scores_and_rejects_unknown_parameters(name, photos, loaded) -> None:
    """What tests/test_registry.py checks for text tasks, for every image task: samples, metrics in [0, 1]."""
    task = registry.build("task", {"name": name, "root": str(photos)})
    samples = task.samples(loaded)
    assert samples and len({s.id for s in samples}) == len(samples)
    s = samples[0]
    perfect, wrong = task.score(s, [s.answer]), task.score(s, [])
    assert perfect and set(perfect) == set(wrong)
    assert all(0.0 <= v <= 1.0 for v in [*perfect.values(), *wrong.values()]) and max(perfect.values()) == 1.0
    with pytest.raises(TokenbenchError, match="no parameter 'no_such_field'"):
        registry.build("task", {"name": name, "no_such_field": 1})


def test_bad_input_fails_before_loading(tmp_path, photos, loaded) -> None:
    with pytest.raises(TokenbenchError, match="not found"):
        build_task(root=str(tmp_path / "missing"))
    (tmp_path / "flat").mkdir()
    (tmp_path / "flat" / "a.jpg").write_bytes(b"")
    with pytest.raises(TokenbenchError, match="no class sub-folders"):
        build_task(root=str(tmp_path / "flat"))
    (tmp_path / "empty" / "cls").mkdir(parents=True)
    with pytest.raises(TokenbenchError, match="no images"):
        build_task(root=str(tmp_path / "empty"))
    for kw in ({"limit": 0}, {"batch_size": 0}, {"workers": -1}):
        with pytest.raises(TokenbenchError, match=list(kw)[0]):
            build_task(root=str(photos), **kw)
    small = TinyViT(img_size=32, patch_size=8, depth=2, num_classes=3).load()
    with pytest.raises(TokenbenchError, match="3 classes"):
        build_task(root=str(photos)).samples(small)


def test_hf_dataset_unavailable_is_one_clear_line(loaded, monkeypatch) -> None:
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    task = build_task(hf_dataset="tokenbench-no-such-dataset/none")
    with pytest.raises(TokenbenchError, match="task.root") as err:
        task.samples(loaded)
    assert "\n" not in str(err.value)


# --- the runner --------------------------------------------------------------------------------------


def stream(loaded, method, task, samples, size: int, **measure):
    runner = VisionRunner(loaded, method, MeasureSettings(**{"warmup": 1, **measure}))
    chunks = [samples[i : i + size] for i in range(0, len(samples), size)]
    outs = [o for chunk in runner.run_batches(task, chunks) for o in chunk]
    return runner, outs


@pytest.mark.parametrize("method_name", ["none", "tome"])
def test_runner_predictions_equal_the_models_own(photos, loaded, method_name) -> None:
    """Top-5 from the batched, pipelined loop equal a plain forward of the normalised images; the chunking
    (3 + 3 + 2) does not change them; the model is unpatched afterwards."""
    task = build_task(root=str(photos))
    samples = task.samples(loaded)
    method = registry.METHODS.get(method_name, "vit").cls(**({"r": 3} if method_name == "tome" else {}))
    runner, outs = stream(loaded, method, task, samples, 3, repeats=2)
    assert len(outs) == N_PHOTOS
    cfg = loaded.info["data_config"]
    x = task.images(samples).float() / 255
    x = (x - torch.tensor(cfg["mean"]).view(1, 3, 1, 1)) / torch.tensor(cfg["std"]).view(1, 3, 1, 1)
    with torch.inference_mode(), method.attach(loaded.model):
        top = loaded.model(x).topk(5, dim=-1).indices.tolist()
    assert [o.text for o in outs] == top
    assert "forward" not in vars(loaded.model.blocks)
    o = outs[0]
    assert o.latency["batch_ms"] > 0 and o.latency["images_per_s"] == pytest.approx(
        3e3 / o.latency["batch_ms"]
    )
    assert o.latency["batch_ms_spread"] >= 0
    assert o.n_context_tokens == 17
    expected = [17, 17] if method_name == "none" else [14, 11]
    assert o.compression["tokens_per_layer"] == expected
    assert o.compression["achieved_keep_ratio"] == pytest.approx(
        1.0 if method_name == "none" else ((17 + 14) / 34 + (14 + 11) / 34) / 2
    )
    assert runner.flops > 0
    summary = runner.summary()
    assert summary["n_images"] == N_PHOTOS and summary["stream_images_per_s"] > 0
    assert summary["flops_per_image"] == runner.flops and summary["execution"] == "eager"


def test_runner_flops_follow_the_method(photos, loaded) -> None:
    task = build_task(root=str(photos), limit=2)
    samples = task.samples(loaded)
    full, _ = stream(loaded, None, task, samples, 2)
    merged, _ = stream(loaded, registry.METHODS.get("tome").cls(r=4), task, samples, 2)
    assert 0 < merged.flops < full.flops


def test_runner_rejects_other_families(loaded) -> None:
    with pytest.raises(TokenbenchError, match="vit-family"):
        VisionRunner(loaded, registry.METHODS.get("streaming_llm").cls(), MeasureSettings())


# --- end to end through the CLI -------------------------------------------------------------------------


def test_cli_run_writes_a_record_and_resumes(tmp_path, photos) -> None:
    out = tmp_path / "res"
    args = [
        "model=tiny-vit",
        "method=tome",
        "method.r=2",
        "task=imagenet",
        f"task.root={photos}",
        "task.batch_size=3",
        "measure.warmup=1",
        "wandb.mode=disabled",
    ]
    proc = tokenbench(*args, out=out, timeout=300)
    assert proc.returncode == 0, proc.stderr
    (run_dir,) = run_dirs(out)
    rec = record(run_dir)
    assert rec["status"] == "ok" and rec["family"] == "vit" and rec["task"] == "imagenet"
    assert rec["n_samples"] == rec["n_samples_expected"] == N_PHOTOS
    assert (
        set(rec["metrics"]) == {"top1", "top5"} and 0 <= rec["metrics"]["top1"] <= rec["metrics"]["top5"] <= 1
    )
    assert rec["budget"] == {"r": 2, "inflection": 0.0, "prop_attn": True}
    assert rec["achieved_keep_ratio"] == pytest.approx(
        ((17 + 15) / 34 + (15 + 13) / 34 + (13 + 11) / 34 + (11 + 9) / 34) / 4
    )
    assert rec["flops"] > 0 and rec["extra"]["flops_per_image"] == rec["flops"]
    assert (
        rec["latency"]["images_per_s"] > 0
        and rec["latency"]["batch_ms_p90"] >= rec["latency"]["batch_ms_p50"]
    )
    assert rec["extra"]["stream_images_per_s"] > 0 and rec["extra"]["n_images"] == N_PHOTOS
    assert rec["memory"]["weights_bytes"] > 0
    assert rec["extra"]["compression"]["tokens_per_layer"] == [15, 13, 11, 9]
    rows = [json.loads(line) for line in (run_dir / "samples.jsonl").read_text().splitlines()]
    assert len(rows) == N_PHOTOS and all(len(r["prediction"]) == 5 for r in rows)
    assert {r["sample_id"] for r in rows} == {
        f"{k}/{n}"
        for k, v in PHOTOS.items()
        for n in [f"{x}{'.png' if i % 2 else '.JPG'}" for i, x in enumerate(v)]
    }
    assert "top1" in proc.stdout

    # cut the log to its first chunk: a second run records the other samples once, with the same predictions
    lines = (run_dir / "samples.jsonl").read_text().splitlines(keepends=True)
    (run_dir / "samples.jsonl").write_text("".join(lines[:3]))
    (run_dir / "result.json").unlink()
    again = tokenbench(*args, out=out, timeout=300)
    assert again.returncode == 0, again.stderr
    rows2 = [json.loads(line) for line in (run_dir / "samples.jsonl").read_text().splitlines()]
    assert [r["sample_id"] for r in rows2] == [r["sample_id"] for r in rows]
    assert [r["prediction"] for r in rows2] == [r["prediction"] for r in rows]
    assert record(run_dir)["extra"]["resumed_with"] == 3


def test_cli_wrong_pairs_fail_before_loading(tmp_path, photos) -> None:
    proc = tokenbench(
        "model=tiny-vit",
        "method=streaming_llm",
        "task=imagenet",
        f"task.root={photos}",
        out=tmp_path / "r",
        timeout=120,
    )
    assert proc.returncode != 0 and "streaming_llm" in proc.stderr and "tome" in proc.stderr
    proc = tokenbench(
        "model=tiny-vit",
        "method=tome",
        "task=imagenet",
        f"task.root={tmp_path / 'nope'}",
        out=tmp_path / "r",
        timeout=120,
    )
    assert proc.returncode != 0 and "image folder not found" in proc.stderr
    assert not (tmp_path / "r").exists()
