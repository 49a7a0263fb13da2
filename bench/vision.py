"""The image-classification runner of the ``vit`` family: batches of images through a timm ViT with a token
reduction method attached, measured per DESIGN.md ("Measurement protocol").

``run_batches(task, chunks)`` is a generator: it yields one list of outputs per chunk of samples, in order,
and keeps the GPU busy while the caller scores and records the previous chunk:

- the task decodes a chunk into ``uint8`` images (resize and crop from the model's timm data config) in a
  background thread, one chunk ahead; on CUDA the images are pinned and copied on a separate stream, so the
  copy of chunk ``i + 1`` overlaps the forward of chunk ``i``;
- normalisation (mean/std) runs on the device, outside the timed region; the forwards of chunks ``i + 1`` and
  ``i + 2`` are queued before the outputs of chunk ``i`` are read (``PIPELINE_DEPTH``), so reading them
  (and the caller's bookkeeping) never leaves the GPU idle;
- timing: CUDA events around the forward alone (the method's selection and merging are inside it);
  ``perf_counter`` on a CPU. Each chunk size gets ``measure.warmup`` untimed forwards first (at least one
  under ``torch.compile`` or CUDA graphs, so compilation and capture stay out of the numbers);
  ``measure.repeats`` timed forwards per chunk give the median and spread;
- memory: one dedicated eager forward of the first chunk after warm-up, peak above the level at its start
  (``tokenbench.measure.peak_memory``); every row of the run carries that figure;
- FLOPs: ``torch.utils.flop_counter.FlopCounterMode`` over one image, once per run, with the method attached
  (``flops`` is per image; merging itself is gathers and scatters, which the counter does not count);
- compression: tokens entering and kept by every block, and the achieved keep ratio (``VitSession.stats``);
- ``summary()``: the loop's own throughput (images over the wall time from the first timed chunk to the end
  of the caller's bookkeeping of the last one), to compare with the bare model's.

Execution (``loaded.info["execution"]``): eager, ``torch.compile`` (static shapes), or CUDA graphs captured
once per input shape (``GraphedForward``).
"""

from __future__ import annotations

import logging
import queue
import statistics
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
from tokenbench.config import MeasureSettings
from tokenbench.errors import TokenbenchError
from tokenbench.families.vit import VisionTokenReducer, input_tokens
from tokenbench.measure import peak_memory

log = logging.getLogger(__name__)

TOPK = 5
PIPELINE_DEPTH = 2  # chunks whose forwards are queued before the oldest one's outputs are read


@dataclass
class VisionOutput:
    """What the run pipeline records for one image."""

    text: list[int]  # the prediction: top-5 class indices, best first
    latency: dict[str, Optional[float]] = field(default_factory=dict)
    memory: dict[str, Optional[int]] = field(default_factory=dict)
    compression: dict[str, Any] = field(default_factory=dict)
    n_context_tokens: Optional[int] = None  # tokens entering the first block
    n_prompt_tokens: Optional[int] = None
    n_generated: Optional[int] = None


# --- execution modes ---------------------------------------------------------------------------------


def autocast(device: torch.device, amp: Optional[str], cache_enabled: bool = True):
    """``torch.autocast`` for the amp dtype name, or a null context."""
    if not amp:
        return nullcontext()
    return torch.autocast(device.type, dtype=getattr(torch, amp), cache_enabled=cache_enabled)


class GraphedForward:
    """The model's forward replayed from CUDA graphs, one captured per input shape: no launch overhead and
    no per-layer Python at replay. The returned logits live in the graph's static output buffer, overwritten
    by the next replay of the same shape (the runner reads them before that)."""

    def __init__(
        self,
        model: torch.nn.Module,
        device: torch.device,
        amp: Optional[str],
        generators: Callable[[], Sequence[torch.Generator]] = lambda: (),
    ):
        self.model, self.device, self.amp, self.generators = model, device, amp, generators
        self.graphs: dict[tuple, tuple[Any, torch.Tensor, torch.Tensor]] = {}

    def _capture(self, x: torch.Tensor) -> tuple[Any, torch.Tensor, torch.Tensor]:
        static_in = x.clone()
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side), autocast(self.device, self.amp, cache_enabled=False):
            for _ in range(2):  # warm-up on a side stream, as CUDA graph capture requires
                self.model(static_in)
        torch.cuda.current_stream(self.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        for gen in self.generators():
            graph.register_generator_state(gen)
        # thread_local: the prefetch thread may pin memory (cudaHostAlloc) while this thread captures; in the
        # default "global" mode that call invalidates the capture (seen on an H200 as a cuDNN attention error)
        with torch.cuda.graph(graph, capture_error_mode="thread_local"), autocast(
            self.device, self.amp, cache_enabled=False
        ):
            static_out = self.model(static_in)
        return graph, static_in, static_out

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        key = (tuple(x.shape), x.dtype)
        if key not in self.graphs:
            self.graphs[key] = self._capture(x)
        graph, static_in, static_out = self.graphs[key]
        static_in.copy_(x)
        graph.replay()
        return static_out


def make_forward(
    model: torch.nn.Module,
    execution: str,
    device: torch.device,
    amp: Optional[str],
    generators: Callable[[], Sequence[torch.Generator]] = lambda: (),
) -> Callable:
    """``forward(x) -> logits`` for an execution mode: eager, compile (``torch.compile``, static shapes) or
    cuda_graph. Autocast is applied inside."""
    if execution == "cuda_graph":
        if device.type != "cuda":
            raise TokenbenchError("execution=cuda_graph needs a CUDA device")
        return GraphedForward(model, device, amp, generators)
    fn = torch.compile(model, dynamic=False) if execution == "compile" else model

    def forward(x: torch.Tensor) -> torch.Tensor:
        with autocast(device, amp):
            return fn(x)

    return forward


def count_flops(model: torch.nn.Module, x: torch.Tensor) -> int:
    """Forward FLOPs of ``model(x)`` with ``FlopCounterMode`` (matrix products, convolutions and attention;
    attention on a CPU is counted with torch's own SDPA formula, which its counter lacks for that kernel)."""
    from torch.utils import flop_counter as fc

    custom = {}
    cpu_sdpa = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    if cpu_sdpa is not None:
        custom[cpu_sdpa] = lambda q, k, v, *args, **kwargs: fc.sdpa_flop_count(q, k, v)
    with torch.inference_mode(), fc.FlopCounterMode(display=False, custom_mapping=custom) as counter:
        model(x)
    return int(counter.get_total_flops())


# --- the runner ----------------------------------------------------------------------------------------


class _Prefetch:
    """Decodes the chunks one ahead in a background thread; pins them when the device is CUDA."""

    def __init__(self, load: Callable[[list], torch.Tensor], chunks: list[list], pin: bool):
        self._q: queue.Queue = queue.Queue(maxsize=2)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._work, args=(load, chunks, pin), daemon=True)
        self._thread.start()

    def _work(self, load, chunks, pin) -> None:
        try:
            for chunk in chunks:
                images = load(chunk)
                if pin:
                    images = images if images.is_pinned() else images.pin_memory()
                while not self._stop.is_set():
                    try:
                        self._q.put(images, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if self._stop.is_set():
                    return
        except BaseException as exc:  # surfaced in the consumer
            self._q.put(exc)

    def get(self) -> torch.Tensor:
        item = self._q.get()
        if isinstance(item, BaseException):
            raise item
        return item

    def close(self) -> None:
        self._stop.set()


class VisionRunner:
    """Runs chunks of image samples through a timm ViT with a vit-family method attached; measures them."""

    def __init__(
        self,
        loaded: Any,
        method: Optional[VisionTokenReducer] = None,
        measure: Optional[MeasureSettings] = None,
    ):
        if method is None:
            from tokenbench.registry import METHODS, load_all

            load_all()
            method = METHODS.get("none", "vit").cls()
        if getattr(method, "family", None) != "vit":
            raise TokenbenchError(
                f"VisionRunner runs vit-family methods; got '{getattr(method, 'name', method)}' "
                f"of family '{getattr(method, 'family', '?')}'"
            )
        self.loaded = loaded
        self.model = loaded.model
        self.method = method
        self.measure = measure if measure is not None else MeasureSettings()
        self.device = torch.device(loaded.device)
        self.amp: Optional[str] = loaded.info.get("amp")
        self.execution: str = loaded.info.get("execution", "eager")
        self.n_tokens = input_tokens(self.model)
        cfg = loaded.info.get("data_config") or {}
        mean, std = cfg.get("mean", (0.485, 0.456, 0.406)), cfg.get("std", (0.229, 0.224, 0.225))
        self.in_dtype = getattr(torch, self.amp) if self.amp else next(self.model.parameters()).dtype
        # (x / 255 - mean) / std = x * scale + shift, one fused multiply-add on the device
        scale = 1.0 / (255.0 * torch.tensor(std, dtype=torch.float64))
        shift = -torch.tensor(mean, dtype=torch.float64) / torch.tensor(std, dtype=torch.float64)
        self._scale = scale.view(1, -1, 1, 1).to(self.device, self.in_dtype)
        self._shift = shift.view(1, -1, 1, 1).to(self.device, self.in_dtype)
        self.flops: Optional[int] = None  # per image, counted once per run
        self._summary: dict[str, Any] = {}

    # --- pieces --------------------------------------------------------------------------------------

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """``uint8`` images on the device -> the model's input (mean/std from its data config)."""
        return torch.addcmul(self._shift, images.to(self.in_dtype), self._scale)

    def _timer(self):
        if self.device.type == "cuda":
            return lambda: _CudaStamp(self.device)
        return _CpuStamp

    def summary(self) -> dict[str, Any]:
        """Run-level facts for the record's ``extra``: the loop's throughput, execution mode, FLOPs."""
        return dict(self._summary)

    # --- the loop ------------------------------------------------------------------------------------

    def run_batches(self, task: Any, chunks: list[list[Any]]) -> Iterator[list[VisionOutput]]:
        """Yield the outputs of each chunk of samples, in order (see the module docstring)."""
        if not chunks:
            return
        cuda = self.device.type == "cuda"
        # cuDNN times its convolution algorithms for the fixed shapes (its default heuristic made ViT-B/16's
        # patch-embedding convolution ~2 ms of a 28 ms batch on an H200); restored afterwards
        cudnn_benchmark = torch.backends.cudnn.benchmark
        torch.backends.cudnn.benchmark = cuda or cudnn_benchmark
        if cuda and hasattr(task, "pin_memory"):
            task.pin_memory()  # preloaded images: pinned once, chunks upload without a host copy
        prefetch = _Prefetch(task.images, chunks, pin=cuda)
        copy_stream = torch.cuda.Stream(self.device) if cuda else None
        stamp = self._timer()
        try:
            with torch.inference_mode(), self.method.attach(self.model) as session:
                gens = lambda: list(session.scratch().get("generators", {}).values())  # noqa: E731
                forward = make_forward(self.model, self.execution, self.device, self.amp, gens)

                def upload(images: torch.Tensor):
                    if not cuda:
                        return images, None
                    with torch.cuda.stream(copy_stream):
                        dev = images.to(self.device, non_blocking=True)
                        done = torch.cuda.Event()
                        done.record(copy_stream)
                    return dev, done

                def ready(item) -> torch.Tensor:
                    dev, done = item
                    if done is not None:
                        torch.cuda.current_stream(self.device).wait_event(done)
                        dev.record_stream(torch.cuda.current_stream(self.device))
                    return self.normalize(dev)

                first_cpu = prefetch.get()
                first = ready(upload(first_cpu))
                self._prepare(forward, first, sorted({len(c) for c in chunks}), session)

                nxt = upload(first_cpu)
                pending: deque = deque()
                t_start = time.perf_counter()
                n_images = 0
                for i, chunk in enumerate(chunks):
                    x = ready(nxt)
                    stamps = []
                    for _ in range(max(1, int(self.measure.repeats))):
                        start = stamp()
                        logits = forward(x)
                        stamps.append((start, stamp()))
                    top = logits.float().topk(min(TOPK, logits.shape[-1]), dim=-1).indices
                    if cuda:
                        top_host = torch.empty(top.shape, dtype=top.dtype, pin_memory=True)
                        top_host.copy_(top, non_blocking=True)
                        fetched = torch.cuda.Event()
                        fetched.record()
                    else:
                        top_host, fetched = top, None
                    stats = session.stats(self.n_tokens)
                    if i + 1 < len(chunks):
                        nxt = upload(prefetch.get())  # the next copy overlaps this forward
                    pending.append((chunk, stamps, top_host, fetched, stats))
                    n_images += len(chunk)
                    # Outputs are handed over PIPELINE_DEPTH chunks late: that many forwards stay queued on
                    # the GPU while the caller scores and writes, so a short forward (ViT-S: ~12 ms per batch
                    # of 256) never waits for the bookkeeping of the previous one.
                    if len(pending) > PIPELINE_DEPTH:
                        yield self._finish(*pending.popleft())
                while pending:
                    yield self._finish(*pending.popleft())
                elapsed = time.perf_counter() - t_start
                self._summary.update(
                    {
                        "stream_images_per_s": n_images / elapsed if elapsed > 0 else None,
                        "stream_s": elapsed,
                        "n_images": n_images,
                    }
                )
        finally:
            prefetch.close()
            torch.backends.cudnn.benchmark = cudnn_benchmark

    def _prepare(self, forward: Callable, first: torch.Tensor, sizes: list[int], session: Any) -> None:
        """Untimed work before the loop: warm-up per chunk size, FLOPs, the memory pass."""
        warm = max(int(self.measure.warmup), 1 if self.execution != "eager" else 0)
        for n in sizes:
            x = (
                first[:n]
                if n <= first.shape[0]
                else first.repeat((n + first.shape[0] - 1) // first.shape[0], 1, 1, 1)[:n]
            )
            for _ in range(warm):
                forward(x)
        with autocast(self.device, self.amp):
            self.flops = count_flops(self.model, first[:1])
        with peak_memory(self.device) as mem, autocast(self.device, self.amp):
            self.model(first)  # eager, so a captured graph's preallocated pool does not hide the activations
        self._memory = mem.as_dict()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self._summary.update(
            {
                "execution": self.execution,
                "amp": self.amp,
                "flops_per_image": self.flops,
                "batch_size": int(first.shape[0]),
                "warmup": warm,
                "input_tokens": self.n_tokens,
                "compression": session.stats(self.n_tokens),
            }
        )

    def _finish(
        self, chunk: list, stamps: list, top_host: torch.Tensor, fetched: Any, stats: dict[str, Any]
    ) -> list[VisionOutput]:
        if fetched is not None:
            fetched.synchronize()
        times = [end.ms_since(start) for start, end in stamps]
        ms = statistics.median(times)
        n = len(chunk)
        latency: dict[str, Optional[float]] = {
            "batch_ms": ms,
            "images_per_s": n * 1e3 / ms if ms > 0 else None,
            "ms_per_image": ms / n,
        }
        if len(times) > 1:
            latency["batch_ms_spread"] = max(times) - min(times)
        # the rows of a chunk share its measurement dicts (they are serialised, never mutated)
        return [
            VisionOutput(
                text=pred,
                latency=latency,
                memory=self._memory,
                compression=stats,
                n_context_tokens=self.n_tokens,
            )
            for pred in top_host.tolist()
        ]


class _CudaStamp:
    """A CUDA event recorded now on the current stream."""

    def __init__(self, device: torch.device):
        self.event = torch.cuda.Event(enable_timing=True)
        self.event.record(torch.cuda.current_stream(device))

    def ms_since(self, start: _CudaStamp) -> float:
        self.event.synchronize()
        return float(start.event.elapsed_time(self.event))


class _CpuStamp:
    """``perf_counter`` now."""

    def __init__(self):
        self.t = time.perf_counter()

    def ms_since(self, start: _CpuStamp) -> float:
        return (self.t - start.t) * 1e3
