"""The ViT throughput script's harness-overhead points (``tokenbench.perf.vit_throughput``), on a CPU with the
tiny ViT: each pipeline depth runs the imagenet task through the real pipeline, and the process-wide
``vision.PIPELINE_DEPTH`` it sets per point is restored afterwards."""

from __future__ import annotations

import argparse

import torch
import tokenbench.vision as vision
from tokenbench.perf import vit_throughput


def test_harness_overhead_runs_each_depth_and_restores_the_setting() -> None:
    before = vision.PIPELINE_DEPTH
    args = argparse.Namespace(batch=4, quick=True, overhead_batches=1, pipeline_depths=[1, before + 1],
                              overhead=[("tiny-vit", "none", 0, "eager")], warmup=1)
    rows = vit_throughput.harness_overhead(args, torch.device("cpu"), [])
    assert [(r["pipeline_depth"], r["status"], r["n_images"]) for r in rows] == [(1, "ok", 8), (before + 1, "ok", 8)]
    assert all(r["loop_images_per_s"] and r["loop_images_per_s"] > 0 for r in rows)
    assert vision.PIPELINE_DEPTH == before
