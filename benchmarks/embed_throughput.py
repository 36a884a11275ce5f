"""Embedding throughput: the model alone, the engine end to end, and a naive open_clip loop.

    python benchmarks/embed_throughput.py --arch ViT-B-32 --out cpu.json    # CPU: 2 shards, 384 samples, b64, fp32
    python benchmarks/embed_throughput.py --arch ViT-B-32 --out h100.json   # CUDA: 8 x 2000 samples, b1024, fp16
    python benchmarks/embed_throughput.py --arch tiny --repeats 3           # a small custom config

One run builds a demo pool (img2dataset shards, 160-360 px JPEG/PNG images, in a temp dir),
ingests it (``ingest_shard``: the accepted samples and their tar offsets are what the engine
reads) and measures, on the same shards and the same randomly initialised weights:

(i)   the forward pass alone: both towers on pre-staged device tensors, autocast per precision,
      pairs/s, FLOPs per pair (``FlopCounterMode``), achieved TFLOP/s and, where the GPU's dense
      16-bit peak is known, MFU;
(ii)  the engine, shard -> sink, through ``embed_shards`` with NullSink, ArrowSink and LanceSink
      (skipped when lancedb does not import), plus the loader alone (decode + resize + tokenize,
      no model) and the sinks alone (the same embeddings written again: Arrow file, LanceDB
      first insert, LanceDB re-commit of the same rows);
(iii) a naive baseline as typically written: a map-style Dataset indexing each tar's members with
      ``tarfile``, PIL decode + open_clip's own ``preprocess``, one caption tokenized per
      ``__getitem__``, a DataLoader with N and with 0 workers, ``encode_image``/``encode_text``
      under autocast and normalisation.

The weights are random (nothing can be downloaded here): a named architecture is built with
``open_clip.create_model(arch, pretrained=None)`` and saved as a safetensors checkpoint, a custom
config (``--arch tiny``, inline JSON or a ``.json`` file) as a teacher directory; both are then
loaded through ``load_teacher``, and the naive loop loads the same file through open_clip.
Only torch, open_clip, pyarrow, pillow (and lancedb if present) are needed, plus the project's
ingestion/embedding modules, none of which import polars or dagster.

Every figure is wall-clock. Each run records the machine, versions and date, a square-GEMM probe
(what the device delivers at the start and the end) and, per stage, the CPU other processes used
meanwhile (``other_load_cores``): on a shared VM that marks figures taken under contention.
"""

from __future__ import annotations

import argparse
import importlib.util
import io
import json
import math
import os
import platform
import statistics
import sys
import tarfile
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import torch

# Dense fp16/bf16 tensor-core peaks (TFLOP/s, no sparsity), matched against the CUDA device name.
PEAK_TFLOPS_16BIT = [
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("H100", 989.0),  # SXM
    ("H200", 989.0),
    ("GH200", 989.0),
    ("A100", 312.0),
]

# ``--arch tiny``: a small ViT/text-transformer CLIP, saved and loaded as a teacher directory.
TINY_CONFIG = {
    "embed_dim": 256,
    "vision_cfg": {"image_size": 224, "layers": 4, "width": 256, "head_width": 64, "patch_size": 32},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 256, "heads": 4, "layers": 4},
}


# --------------------------------------------------------------------------------------------
# Machine and setup


def machine_info(device: torch.device) -> dict[str, Any]:
    import open_clip
    import PIL
    import pyarrow

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        memory_gib = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    except (ValueError, OSError, AttributeError):
        memory_gib = None
    info: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d"),
        "cpu": cpu,
        "cores": os.cpu_count(),
        "usable_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "memory_gib": memory_gib,
        "gpu": None,
        "device": str(device),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "open_clip": open_clip.__version__,
        "pyarrow": pyarrow.__version__,
        "pillow": PIL.__version__,
        "lancedb": lancedb_version(),
        "torch_threads": torch.get_num_threads(),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info |= {"gpu": props.name, "gpu_memory_gib": round(props.total_memory / 2**30, 1),
                 "cuda": torch.version.cuda}
    return info


def lancedb_version() -> str | None:
    try:
        import lancedb
    except Exception:  # not installed, or broken: the Lance sink is skipped
        return None
    return getattr(lancedb, "__version__", "unknown")


class OtherLoad:
    """CPU seconds used by processes outside this run's process tree while a stage runs, from
    ``/proc`` (Linux; 0 elsewhere). On a shared VM this says which figures were taken while
    something else competed for the cores: ``cores`` = those seconds / the stage's wall time."""

    def __enter__(self) -> OtherLoad:
        self.before = _other_cpu_seconds()
        self.started = time.perf_counter()
        self.cores = 0.0
        return self

    def __exit__(self, *exc: object) -> None:
        after = _other_cpu_seconds()
        used = sum(max(0.0, seconds - self.before.get(pid, 0.0)) for pid, seconds in after.items())
        self.cores = round(used / max(1e-9, time.perf_counter() - self.started), 2)


def _other_cpu_seconds() -> dict[int, float]:
    try:
        ticks = os.sysconf("SC_CLK_TCK")
        table: dict[int, tuple[int, float]] = {}
        for entry in os.scandir("/proc"):
            if not entry.name.isdigit():
                continue
            try:
                fields = Path(entry.path, "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:  # exited meanwhile
                continue
            table[int(entry.name)] = (int(fields[1]), (int(fields[11]) + int(fields[12])) / ticks)
    except (OSError, ValueError, AttributeError):
        return {}
    me = os.getpid()

    def mine(pid: int) -> bool:
        for _ in range(64):
            if pid == me:
                return True
            if pid not in table or pid <= 1:
                return False
            pid = table[pid][0]
        return False

    return {pid: seconds for pid, (_, seconds) in table.items() if not mine(pid)}


def peak_tflops(device: torch.device, dtype: torch.dtype | None, override: float | None) -> float | None:
    if override:
        return override
    if device.type != "cuda" or dtype not in (torch.float16, torch.bfloat16):
        return None  # CPU peaks are not known here; fp32/TF32 peaks are not tabulated
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in PEAK_TFLOPS_16BIT if key in name), None)


def build_jobs(root: Path, shards: int, samples: int, workers: int) -> tuple[list, dict[str, Any]]:
    """Demo pool -> discovered shards -> ingested accepted samples: the engine's jobs."""
    from curation_platform.demo import DemoPoolConfig, build_demo_pool
    from curation_platform.ingest import ingest_shard, make_executor
    from curation_platform.pool import discover_shards

    started = time.perf_counter()
    per_shard = math.ceil(samples / shards)
    build_demo_pool(DemoPoolConfig(out=root / "demo", shards=shards, samples_per_shard=per_shard, seed=0,
                                   reference_samples=16, target_samples=16, eval_samples=16,
                                   workers=max(1, min(shards, os.cpu_count() or 1))))
    built = time.perf_counter()
    refs = discover_shards(str(root / "demo" / "pool"))
    executor = make_executor(workers)
    try:
        jobs = [(ref, ingest_shard(ref, executor=executor).accepted) for ref in refs]
    finally:
        if executor is not None:
            executor.shutdown()
    info = {
        "shards": len(jobs),
        "samples_generated": per_shard * shards,
        "pairs": sum(table.num_rows for _, table in jobs),
        "tar_mb": round(sum(ref.tar.size for ref, _ in jobs) / 1e6, 1),
        "build_s": round(built - started, 1),
        "ingest_s": round(time.perf_counter() - built, 1),
    }
    return jobs, info


def custom_config(arch: str) -> dict[str, Any] | None:
    if arch == "tiny":
        return TINY_CONFIG
    if arch.lstrip().startswith("{"):
        return json.loads(arch)
    if arch.endswith(".json"):
        config = json.loads(Path(arch).read_text())
        return config.get("model_cfg", config)
    return None


def make_teacher(arch: str, workdir: Path, device: torch.device, seed: int) -> tuple[Any, dict[str, Any]]:
    """Random weights saved to disk, then loaded through the project's real loading path."""
    import open_clip
    from safetensors.torch import save_file

    from curation_platform.teachers import TeacherSpec, load_teacher, save_teacher_directory

    torch.manual_seed(seed)
    config = custom_config(arch)
    if config is None:
        model = open_clip.create_model(arch, pretrained=None, device="cpu")
        checkpoint = workdir / "teacher.safetensors"
        save_file({name: tensor.detach().cpu().contiguous() for name, tensor in model.state_dict().items()},
                  str(checkpoint))
        spec = TeacherSpec(architecture=arch, checkpoint=str(checkpoint))
        naive = {"model_name": arch, "pretrained": str(checkpoint)}
    else:
        model_class = open_clip.CustomTextCLIP if "hf_model_name" in config.get("text_cfg", {}) else open_clip.CLIP
        model = model_class(**config)
        directory = workdir / "teacher"
        save_teacher_directory(model, config, open_clip.get_model_preprocess_cfg(model), str(directory))
        spec = TeacherSpec(checkpoint=str(directory))
        naive = {"model_name": f"local-dir:{directory}", "pretrained": None}
    del model
    teacher = load_teacher(spec, device="cpu").to(device)
    return teacher, naive


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def gemm_probe(device: torch.device, dtype: torch.dtype | None, seconds: float = 1.0) -> float:
    """TFLOP/s of a plain square matmul in the run's precision: what this device delivers right
    now (a shared VM's CPU can vary by tens of percent from minute to minute)."""
    n = 8192 if device.type == "cuda" else 1024
    a = torch.randn(n, n, device=device, dtype=dtype or torch.float32)
    for _ in range(2):
        a @ a
    sync(device)
    count, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        a @ a
        count += 1
        if device.type == "cuda" and count % 10:
            continue
        sync(device)
    sync(device)
    return round(2 * n**3 * count / (time.perf_counter() - started) / 1e12, 3)


# --------------------------------------------------------------------------------------------
# (i) forward pass alone


def count_flops(teacher: Any, pixels: torch.Tensor, tokens: torch.Tensor, n: int = 4) -> tuple[float, float]:
    """FLOPs per pair of each tower, counted on ``n`` samples.

    Counted with autograd enabled so ``nn.MultiheadAttention`` takes its decomposed path: under
    ``inference_mode`` its fused fast path (``_native_multi_head_attention``) is invisible to
    ``FlopCounterMode`` and a ViT's attention FLOPs would be missed (ViT-B-32: 5.9 instead of 8.7
    GFLOPs per image).
    """
    from torch.utils.flop_counter import FlopCounterMode

    model = teacher.model
    flags = [(param, param.requires_grad) for param in model.parameters()]
    for param, _ in flags:
        param.requires_grad_(True)
    try:
        results = []
        for encode, inputs in ((model.encode_image, pixels[:n].float()), (model.encode_text, tokens[:n])):
            counter = FlopCounterMode(display=False)
            with torch.enable_grad(), counter:
                encode(inputs)
            results.append(counter.get_total_flops() / n)
    finally:
        for param, flag in flags:
            param.requires_grad_(flag)
    return results[0], results[1]


def bench_forward(teacher: Any, device: torch.device, dtype: torch.dtype | None, batch: int, captions: list[str],
                  seconds: float, min_iters: int, warmup: int, peak: float | None) -> dict[str, Any]:
    size = teacher.preprocessing.size
    generator = torch.Generator().manual_seed(0)
    raw = torch.randint(0, 256, (batch, 3, size, size), dtype=torch.uint8, generator=generator)
    mean = torch.tensor(teacher.preprocessing.mean).view(1, 3, 1, 1) * 255
    std = torch.tensor(teacher.preprocessing.std).view(1, 3, 1, 1) * 255
    pixels = ((raw.float() - mean) / std).to(device)
    tokens = teacher.tokenize([captions[i % len(captions)] for i in range(batch)]).to(device)
    image_flops, text_flops = count_flops(teacher, pixels, tokens)

    def step() -> tuple[float, float]:
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            start = time.perf_counter()
            teacher.encode_images(pixels)
            sync(device)
            middle = time.perf_counter()
            teacher.encode_texts(tokens)
            sync(device)
            return middle - start, time.perf_counter() - middle

    for _ in range(warmup):
        step()
    image_times, text_times = [], []
    started = time.perf_counter()
    while len(image_times) < min_iters or time.perf_counter() - started < seconds:
        image_s, text_s = step()
        image_times.append(image_s)
        text_times.append(text_s)
    total = [a + b for a, b in zip(image_times, text_times)]
    pairs_per_s = batch * len(total) / sum(total)
    flops = image_flops + text_flops
    achieved = flops * pairs_per_s / 1e12
    return {
        "batch": batch,
        "iterations": len(total),
        "seconds": round(sum(total), 2),
        "pairs_per_s": round(pairs_per_s, 1),
        "pairs_per_s_median_iter": round(batch / statistics.median(total), 1),
        "pairs_per_s_best_iter": round(batch / min(total), 1),
        "iter_cv": round(statistics.pstdev(total) / statistics.mean(total), 3) if len(total) > 1 else None,
        "image_tower_per_s": round(batch * len(image_times) / sum(image_times), 1),
        "text_tower_per_s": round(batch * len(text_times) / sum(text_times), 1),
        "image_gflops_per_pair": round(image_flops / 1e9, 3),
        "text_gflops_per_pair": round(text_flops / 1e9, 3),
        "achieved_tflops": round(achieved, 3),
        "peak_tflops": peak,
        "mfu": round(achieved / peak, 4) if peak else None,
    }


# --------------------------------------------------------------------------------------------
# (ii) the engine, its loader and its sinks


def worker_context() -> Any:
    """The engine's DataLoader context (forkserver, torch/open_clip/loader preloaded)."""
    from curation_platform.embedding.engine import worker_context as engine_worker_context

    return engine_worker_context()


def bench_loader(teacher: Any, jobs: list, workers: int, chunk_size: int, prefetch: int,
                 limit: int | None = None) -> dict[str, Any]:
    """Iterate the engine's DataLoader without a model: decode + resize + tokenize rate."""
    from curation_platform.embedding.loader import ChunkDataset, ImagePreprocessor, plan_chunks

    chunks = [chunk for job, (ref, samples) in enumerate(jobs)
              for chunk in plan_chunks(job, ref.tar.uri, samples, chunk_size)]
    if limit is not None:
        chunks = chunks[: max(1, limit // chunk_size)]
    loader = torch.utils.data.DataLoader(
        ChunkDataset(chunks, ImagePreprocessor(teacher.preprocessing), teacher.tokenizer),
        batch_size=None, num_workers=workers, prefetch_factor=prefetch if workers else None,
        multiprocessing_context=worker_context() if workers else None,
    )
    started = time.perf_counter()
    batches = iter(loader)
    first = next(batches)
    first_at = time.perf_counter()
    images = len(first["uids"])
    for chunk in batches:
        images += len(chunk["uids"])
    ended = time.perf_counter()
    del batches
    later = images - len(first["uids"])
    return {
        "workers": workers,
        "images": images,
        "seconds": round(ended - started, 2),
        "first_chunk_s": round(first_at - started, 2),
        "images_per_s": round(images / (ended - started), 1),
        "images_per_s_after_first": round(later / (ended - first_at), 1) if later and ended > first_at else None,
    }


def make_sink(kind: str, root: Path) -> Any:
    from curation_platform.embedding.sinks import ArrowSink, LanceSink, NullSink

    if kind == "null":
        return NullSink()
    if kind == "arrow":
        return ArrowSink(str(root))
    return LanceSink(str(root))


def bench_engine(teacher: Any, jobs: list, sink_kind: str, root: Path, config: Any) -> dict[str, Any]:
    from curation_platform.embedding.engine import embed_shards

    sink = make_sink(sink_kind, root)
    started = time.perf_counter()
    reports = embed_shards(teacher, jobs, sink, config)
    wall = time.perf_counter() - started
    rows = sum(report.rows for report in reports)
    in_shards = sum(report.seconds for report in reports)
    return {
        "sink": sink_kind,
        "pairs": rows,
        "seconds": round(wall, 2),
        "pairs_per_s": round(rows / wall, 1),
        "startup_s": round(wall - in_shards, 2),  # workers up + first chunk, before the first shard's clock
        "pairs_per_s_in_shards": round(rows / in_shards, 1) if in_shards else None,
    }


def summarise(runs: list[dict[str, Any]], key: str) -> dict[str, Any]:
    """The median run of repeated measurements, with every run's rate alongside."""
    ordered = sorted(runs, key=lambda run: run[key])
    return {**ordered[(len(ordered) - 1) // 2], f"{key}_runs": [run[key] for run in runs]}


def read_arrow_embeddings(root: Path, teacher: Any, jobs: list) -> list[tuple[str, list]]:
    import pyarrow as pa

    from curation_platform.embedding.sinks import ArrowSink

    sink = ArrowSink(str(root))
    shards = []
    for ref, _ in jobs:
        with pa.memory_map(sink.path(ref.name, teacher.teacher_id)) as source:
            table = pa.ipc.open_file(source).read_all()
        shards.append((ref.name, table.combine_chunks().to_batches(max_chunksize=1 << 30)))
    return shards


def bench_sink_write(kind: str, root: Path, shards: list[tuple[str, list]], teacher: Any) -> dict[str, Any]:
    """Write the same embeddings again through a sink's shard writers (no model, no loader)."""
    sink = make_sink(kind, root)
    rows = sum(batch.num_rows for _, batches in shards for batch in batches)
    started = time.perf_counter()
    for shard, batches in shards:
        with sink.shard_writer(shard, teacher.teacher_id, teacher.embed_dim) as writer:
            for batch in batches:
                writer.write(batch)
    seconds = time.perf_counter() - started
    return {"rows": rows, "seconds": round(seconds, 3), "rows_per_s": round(rows / seconds, 1),
            "ms_per_shard": round(1000 * seconds / len(shards), 1)}


def host_batch_assembly(batch: int, chunk_size: int, size: int, dim: int, repeats: int = 3) -> dict[str, Any]:
    """Main-process CPU work per batch in the engine outside the model: the ``torch.cat`` of the
    chunks' uint8 pixels and the embeddings -> Arrow RecordBatch conversion."""
    import numpy as np

    from curation_platform.embedding.sinks import record_batch

    chunks = [torch.zeros(chunk_size, 3, size, size, dtype=torch.uint8) for _ in range(max(1, batch // chunk_size))]
    rows = chunk_size * len(chunks)
    images = np.random.default_rng(0).standard_normal((rows, dim), dtype=np.float32)
    uids = [f"{i:032x}" for i in range(rows)]
    cat_s, arrow_s = [], []
    for _ in range(repeats):
        start = time.perf_counter()
        torch.cat(chunks)
        middle = time.perf_counter()
        record_batch(uids, "teacher", "shard", images, images)
        arrow_s.append(time.perf_counter() - middle)
        cat_s.append(middle - start)
    return {"rows": rows, "pixels_mb": round(rows * 3 * size * size / 1e6, 1),
            "cat_ms": round(1000 * min(cat_s), 2), "record_batch_ms": round(1000 * min(arrow_s), 2)}


# --------------------------------------------------------------------------------------------
# (iii) the naive baseline


class NaiveTarDataset(torch.utils.data.Dataset):
    """What a user typically writes: index the tar's members once, read a sample per item."""

    def __init__(self, tar_path: str, image_members: list[str], transform: Any, tokenizer: Any) -> None:
        self.tar_path = tar_path
        self.transform = transform
        self.tokenizer = tokenizer
        with tarfile.open(tar_path) as tar:
            members = {member.name: member for member in tar.getmembers()}
        self.samples = [(members[name], members[name.rsplit(".", 1)[0] + ".txt"]) for name in image_members]
        self.tar: tarfile.TarFile | None = None

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        from PIL import Image

        if self.tar is None:  # opened lazily: one handle per worker
            self.tar = tarfile.open(self.tar_path)
        image_member, text_member = self.samples[index]
        image = Image.open(io.BytesIO(self.tar.extractfile(image_member).read())).convert("RGB")
        caption = self.tar.extractfile(text_member).read().decode("utf-8")
        return self.transform(image), self.tokenizer([caption])[0]


def bench_naive(naive: dict[str, Any], jobs: list, device: torch.device, dtype: torch.dtype | None, batch: int,
                workers: int) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    import open_clip

    model, _, preprocess = open_clip.create_model_and_transforms(naive["model_name"], pretrained=naive["pretrained"])
    tokenizer = open_clip.get_tokenizer(naive["model_name"])
    model = model.to(device).eval()
    uids: list[str] = []
    datasets = []
    for ref, samples in jobs:
        ordered = samples.sort_by("image_offset")
        datasets.append(NaiveTarDataset(ref.tar.uri, ordered.column("image_member").to_pylist(), preprocess, tokenizer))
        uids += ordered.column("uid").to_pylist()
    started = time.perf_counter()
    loader = torch.utils.data.DataLoader(torch.utils.data.ConcatDataset(datasets), batch_size=batch, shuffle=False,
                                         num_workers=workers, pin_memory=device.type == "cuda")
    image_out, text_out = [], []
    with torch.no_grad(), torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
        for images, texts in loader:
            images = images.to(device, non_blocking=True)
            texts = texts.to(device, non_blocking=True)
            image_features = model.encode_image(images)
            text_features = model.encode_text(texts)
            image_features = image_features / image_features.norm(dim=-1, keepdim=True)
            text_features = text_features / text_features.norm(dim=-1, keepdim=True)
            image_out.append(image_features.float().cpu())
            text_out.append(text_features.float().cpu())
    seconds = time.perf_counter() - started
    pairs = len(uids)
    embeddings = {"uids": uids, "image": torch.cat(image_out), "text": torch.cat(text_out)}
    return {"workers": workers, "pairs": pairs, "seconds": round(seconds, 2),
            "pairs_per_s": round(pairs / seconds, 1)}, embeddings


def agreement(engine_shards: list[tuple[str, list]], naive: dict[str, Any]) -> dict[str, Any]:
    """Cosine between the engine's and the naive loop's embeddings of the same samples."""
    import pyarrow as pa

    table = pa.Table.from_batches([batch for _, batches in engine_shards for batch in batches])
    position = {uid: row for row, uid in enumerate(table.column("uid").to_pylist())}
    order = torch.tensor([position[uid] for uid in naive["uids"]])
    result = {}
    for name, column in (("image", "image_embedding"), ("text", "text_embedding")):
        values = table.column(column).combine_chunks()
        engine = torch.from_numpy(values.values.to_numpy().reshape(len(values), -1).copy())[order]
        cosine = (engine * naive[name]).sum(dim=1)
        result[name] = {"min_cosine": round(float(cosine.min()), 5), "median_cosine": round(float(cosine.median()), 6),
                        "below_0_999": int((cosine < 0.999).sum())}
    return result


# --------------------------------------------------------------------------------------------
# Report


def _runs(result: dict[str, Any], key: str) -> str:
    runs = result.get(f"{key}_runs") or []
    return f" [runs {min(runs):,.1f}-{max(runs):,.1f}]" if len(runs) > 1 else ""


def _load(result: dict[str, Any]) -> str:
    cores = result.get("other_load_cores") or 0.0
    return f"; OTHER PROCESSES used {cores:.1f} cores meanwhile" if cores >= 0.1 else ""


def format_table(results: dict[str, Any]) -> str:
    rows: list[tuple[str, str, str]] = []
    forward = results["forward"]
    gflops = forward["image_gflops_per_pair"] + forward["text_gflops_per_pair"]
    if forward["mfu"] is not None:
        utilisation = f"MFU {forward['mfu']:.1%} of {forward['peak_tflops']:g}"
    else:
        utilisation = f"{forward['vs_gemm_probe']:.0%} of the GEMM probe, MFU n/a (peak unknown)"
    rows.append(("(i) forward, both towers, pre-staged", f"{forward['pairs_per_s']:,.1f}",
                 f"batch {forward['batch']} x {forward['iterations']}, {gflops:.2f} GFLOP/pair, "
                 f"{forward['achieved_tflops']:.3f} TFLOP/s, {utilisation}{_load(forward)}"))
    rows.append(("    image tower / text tower alone", f"{forward['image_tower_per_s']:,.1f} / "
                 f"{forward['text_tower_per_s']:,.1f}", f"{forward['image_gflops_per_pair']:.2f} / "
                 f"{forward['text_gflops_per_pair']:.2f} GFLOP per pair"))
    for loader in results["loader"]:
        after = loader["images_per_s_after_first"]
        rows.append((f"(ii) loader alone (decode+resize+tokenize), {loader['workers']} workers",
                     f"{loader['images_per_s']:,.1f}",
                     f"images/s over {loader['images']}; {after or '-'}/s after the first chunk "
                     f"({loader['first_chunk_s']} s){_load(loader)}"))
    for engine in results["engine"]:
        rows.append((f"(ii) engine -> {engine['sink']} sink", f"{engine['pairs_per_s']:,.1f}",
                     f"{engine['pairs']} pairs in {engine['seconds']} s, start-up {engine['startup_s']} s"
                     f"{_runs(engine, 'pairs_per_s')}{_load(engine)}"))
    for name, write in results["sink_write"].items():
        rows.append((f"     sink alone: {name}", f"{write['rows_per_s']:,.0f}",
                     f"rows/s, {write['ms_per_shard']} ms per shard commit"))
    for note in results["skipped"]:
        rows.append(("     skipped", "", note))
    for naive in results["naive"]:
        rows.append((f"(iii) naive open_clip loop, {naive['workers']} workers", f"{naive['pairs_per_s']:,.1f}",
                     f"{naive['pairs']} pairs in {naive['seconds']} s{_runs(naive, 'pairs_per_s')}{_load(naive)}"))
    width = max(len(row[0]) for row in rows)
    number = max(len(row[1]) for row in rows)
    lines = [f"{'stage':<{width}}  {'per s':>{number}}  notes"]
    lines += [f"{label:<{width}}  {value:>{number}}  {note}".rstrip() for label, value, note in rows]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default="ViT-B-32",
                        help="open_clip architecture name, 'tiny', an inline JSON model config or a .json file")
    parser.add_argument("--samples", type=int, help="demo samples generated over all shards (default: 16000 on "
                        "CUDA, 384 on CPU); ingestion quarantines the demo's corrupt ones, the rest are embedded")
    parser.add_argument("--shards", type=int, help="default: 8 on CUDA, 2 on CPU")
    parser.add_argument("--batch-size", type=int, help="default: 1024 on CUDA, 64 on CPU")
    parser.add_argument("--chunk-size", type=int, default=32)
    parser.add_argument("--workers", type=int, help="engine DataLoader workers (default: min(16, cores) on CUDA, "
                        "cores on CPU)")
    parser.add_argument("--naive-workers", type=int, help="default: 16 on CUDA, cores on CPU (0 workers always runs)")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    parser.add_argument("--precision", choices=["auto", "fp32", "fp16", "bf16"], default="auto",
                        help="auto: fp16 autocast on CUDA, fp32 on CPU")
    parser.add_argument("--sinks", default="null,arrow,lance", help="engine sinks to run, comma-separated")
    parser.add_argument("--repeats", type=int, default=1,
                        help="rounds of the end-to-end runs (engine sinks and naive loops interleaved); the median "
                        "round is reported")
    parser.add_argument("--forward-seconds", type=float, help="forward timing budget (default 10 s on CUDA, 8 on CPU)")
    parser.add_argument("--peak-tflops", type=float, help="override the device's dense 16-bit peak for MFU")
    parser.add_argument("--skip-naive", action="store_true")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", help="write the results as JSON here")
    args = parser.parse_args()

    missing = [name for name in ("open_clip", "safetensors", "py3langid") if importlib.util.find_spec(name) is None]
    if missing:  # py3langid: ingestion detects each caption's language
        sys.exit(f"missing Python packages: {', '.join(missing)} (pip install {' '.join(missing)})")
    from curation_platform.embedding.engine import EmbedConfig

    cuda = torch.cuda.is_available() if args.device == "auto" else args.device == "cuda"
    device = torch.device("cuda" if cuda else "cpu")
    cores = os.cpu_count() or 1
    samples = args.samples or (16_000 if cuda else 384)
    shards = args.shards or (8 if cuda else 2)
    batch = args.batch_size or (1024 if cuda else 64)
    workers = args.workers if args.workers is not None else (min(16, cores) if cuda else cores)
    naive_workers = args.naive_workers if args.naive_workers is not None else (16 if cuda else cores)
    forward_seconds = args.forward_seconds or (10.0 if cuda else 8.0)
    config = EmbedConfig(device=device.type, batch_size=batch, chunk_size=args.chunk_size, workers=workers,
                         precision=args.precision)
    dtype = config.autocast_dtype(device)
    precision = {None: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}[dtype]
    sinks = [sink.strip() for sink in args.sinks.split(",") if sink.strip()]
    skipped: list[str] = []
    if "lance" in sinks and lancedb_version() is None:
        sinks.remove("lance")
        skipped.append("LanceSink: lancedb does not import on this machine")
    # The naive loader forks (the DataLoader default) a process that ran LanceSink: lancedb warns.
    warnings.filterwarnings("ignore", message="lancedb fork support is experimental")

    machine = machine_info(device)
    machine["gemm_probe_tflops"] = {"start": gemm_probe(device, dtype)}
    print(f"# {machine['date']}  {machine['cpu']} x{machine['cores']}  {machine['gpu'] or 'no GPU'}  "
          f"torch {machine['torch']}  open_clip {machine['open_clip']}  lancedb {machine['lancedb']}  "
          f"GEMM probe {machine['gemm_probe_tflops']['start']} TFLOP/s", flush=True)
    results: dict[str, Any] = {"machine": machine, "skipped": skipped}
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="embed-bench-") as tmp:
        root = Path(tmp)
        jobs, data = build_jobs(root, shards, samples, workers=min(cores, 8))
        print(f"# data: {data}", flush=True)
        teacher, naive_model = make_teacher(args.arch, root, device, args.seed)
        params = sum(p.numel() for p in teacher.model.parameters())
        results["config"] = {"arch": args.arch, "model_cfg": teacher.model_config, "teacher_id": teacher.teacher_id,
                             "params_m": round(params / 1e6, 1), "image_size": teacher.preprocessing.size,
                             "device": str(device), "precision": precision,
                             "batch_size": batch, "chunk_size": args.chunk_size, "workers": workers,
                             "naive_workers": naive_workers, "repeats": args.repeats, **data}
        print(f"# model: {teacher.teacher_id} ({params / 1e6:.1f} M params), {device}, {precision}, batch {batch}, "
              f"engine workers {workers}", flush=True)
        captions = jobs[0][1].column("caption").to_pylist()

        # (i) the model alone
        with OtherLoad() as load:
            forward = bench_forward(teacher, device, dtype, batch, captions, forward_seconds,
                                    min_iters=3 if cuda else 2, warmup=5 if cuda else 1,
                                    peak=peak_tflops(device, dtype, args.peak_tflops))
        forward["other_load_cores"] = load.cores
        forward["vs_gemm_probe"] = round(forward["achieved_tflops"] / machine["gemm_probe_tflops"]["start"], 3)
        results["forward"] = forward
        print(f"# forward: {forward}", flush=True)

        # (ii) the loader alone: a cold pass (starts the forkserver), a warm one, then one process.
        def loader_run(count: int, limit: int | None = None) -> dict[str, Any]:
            with OtherLoad() as load:
                run = bench_loader(teacher, jobs, count, args.chunk_size, config.prefetch_factor, limit)
            return {**run, "other_load_cores": load.cores}

        loader_runs = [loader_run(workers) for _ in range(2 if workers else 1)]
        results["loader_cold_first_chunk_s"] = loader_runs[0]["first_chunk_s"]
        results["loader"] = [loader_runs[-1]] + ([loader_run(0, limit=2_000)] if workers else [])
        print(f"# loader: {results['loader']} (cold first chunk {results['loader_cold_first_chunk_s']} s)",
              flush=True)
        results["host_batch_assembly"] = host_batch_assembly(batch, args.chunk_size, teacher.preprocessing.size,
                                                             teacher.embed_dim)

        # (ii) the engine end to end and (iii) the naive loop, interleaved round by round.
        naive_counts = [] if args.skip_naive else list(dict.fromkeys([naive_workers, 0]))
        if args.skip_naive:
            skipped.append("naive baseline (--skip-naive)")
        engine_runs: dict[str, list] = {sink: [] for sink in sinks}
        naive_runs: dict[int, list] = {count: [] for count in naive_counts}
        naive_embeddings = None
        for round_ in range(args.repeats):
            for sink in sinks:
                with OtherLoad() as load:
                    run = bench_engine(teacher, jobs, sink, root / f"engine-{sink}-{round_}", config)
                engine_runs[sink].append({**run, "other_load_cores": load.cores})
                print(f"# engine: {engine_runs[sink][-1]}", flush=True)
            for count in naive_counts:
                with OtherLoad() as load:
                    run, naive_embeddings = bench_naive(naive_model, jobs, device, dtype, batch, count)
                naive_runs[count].append({**run, "other_load_cores": load.cores})
                print(f"# naive: {naive_runs[count][-1]}", flush=True)
        results["engine"] = [summarise(runs, "pairs_per_s") for runs in engine_runs.values()]
        results["naive"] = [summarise(runs, "pairs_per_s") for runs in naive_runs.values()]

        # (ii) the sinks alone, on the embeddings the Arrow run wrote (median of three rounds).
        results["sink_write"] = {}
        if "arrow" in sinks:
            embeddings = read_arrow_embeddings(root / "engine-arrow-0", teacher, jobs)
            writes: dict[str, list] = {}
            for round_ in range(3):
                writes.setdefault("arrow", []).append(
                    bench_sink_write("arrow", root / f"replay-arrow-{round_}", embeddings, teacher))
                if lancedb_version() is not None:
                    uri = root / f"replay-lance-{round_}"
                    writes.setdefault("lance insert", []).append(bench_sink_write("lance", uri, embeddings, teacher))
                    writes.setdefault("lance re-commit", []).append(
                        bench_sink_write("lance", uri, embeddings, teacher))
            results["sink_write"] = {name: summarise(runs, "rows_per_s") for name, runs in writes.items()}
            print(f"# sink alone: {results['sink_write']}", flush=True)
            if naive_embeddings is not None:
                results["agreement_engine_vs_naive"] = agreement(embeddings, naive_embeddings)
                print(f"# engine vs naive embeddings: {results['agreement_engine_vs_naive']}", flush=True)

    machine["gemm_probe_tflops"]["end"] = gemm_probe(device, dtype)
    results["total_s"] = round(time.perf_counter() - started, 1)
    print()
    label = args.arch if custom_config(args.arch) is None or args.arch == "tiny" else "custom config"
    print(f"{label} on {machine['gpu'] or machine['cpu']} ({device}, {precision}), {data['shards']} shards, "
          f"{data['pairs']} pairs, batch {batch}, engine workers {workers}; GEMM probe "
          f"{machine['gemm_probe_tflops']['start']} -> {machine['gemm_probe_tflops']['end']} TFLOP/s; "
          f"{results['total_s']} s")
    print(format_table(results))
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
        print(f"\nwrote {args.out}")


if __name__ == "__main__":
    sys.exit(main())
