"""Tiny teachers for the tests: random-weight teachers saved as teacher directories, the tiny training
configuration, and a subprocess body that embeds one shard."""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path

import open_clip
import torch

from curation_platform.embedding.engine import EmbedConfig, embed_shard
from curation_platform.embedding.sinks import LanceSink
from curation_platform.evaluation.scales import EvalScale
from curation_platform.ingest import ingest_shard
from curation_platform.pool import discover_shards
from curation_platform.teachers import TeacherSpec, load_teacher, save_teacher_directory
from curation_platform.training import ModelConfig, TrainingConfig

# open_clip configuration of a tiny random-weight CLIP (32-d embeddings, 32 px images)
TINY_CONFIG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 16, "head_width": 16},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}
# the embedding engine on CPU in small batches and chunks, without decode workers
CPU = EmbedConfig(device="cpu", batch_size=64, chunk_size=16, workers=0)


def tiny_teacher_dir(root: Path, seed: int = 0, **overrides) -> Path:
    """Save a ``TINY_CONFIG`` teacher with random weights (``seed``) into ``root`` (returned); each override
    fills a model parameter with a value, e.g. ``logit_scale=3.0``."""
    torch.manual_seed(seed)
    model = open_clip.model.CLIP(**TINY_CONFIG)
    for name, value in overrides.items():
        getattr(model, name).data.fill_(value)
    save_teacher_directory(model, TINY_CONFIG, {"size": 32}, str(root))
    return root


# a small teacher trained in seconds on CPU from a demo reference split
TINY = TrainingConfig(
    model=ModelConfig(embed_dim=64, vision_width=64, vision_layers=2, text_width=64, text_heads=1, text_layers=1),
    epochs=12,
    batch_size=64,
    lr=2e-3,
    warmup_steps=5,
    held_out_fraction=0.2,
    seed=0,
)


def embed_in_child(teacher_dir: str, pool: str, shard_name: str, lance_uri: str, delay: float) -> None:
    """Subprocess body (a spawned process or ``python -c`` imports it from here): embed one shard; ``delay``
    slows each batch so a test can kill it mid-shard."""
    teacher = load_teacher(TeacherSpec(checkpoint=teacher_dir))
    (shard,) = [s for s in discover_shards(pool) if s.name == shard_name]
    samples = ingest_shard(shard).accepted
    sink = LanceSink(lance_uri)
    if delay:
        original = sink.shard_writer

        def slow_writer(*args, **kwargs):
            manager = original(*args, **kwargs)

            class Slow:
                def __enter__(self):
                    writer = manager.__enter__()
                    write = writer.write
                    writer.write = lambda batch: (time.sleep(delay), write(batch))
                    print("writing", flush=True)
                    return writer

                def __exit__(self, *exc):
                    return manager.__exit__(*exc)

            return Slow()

        sink.shard_writer = slow_writer
    embed_shard(teacher, shard, samples, sink, replace(CPU, batch_size=16))


# A student small enough to train in seconds (4 steps of 16 pairs): evaluation tests' scale.
TINY_STUDENT = EvalScale(
    name="tiny", model="curation-test-student", samples_seen=64, batch_size=16, lr=1e-3, warmup_steps=1,
    precision="fp32", threads=1, seeds=2,
    model_cfg={"embed_dim": 32,
               "vision_cfg": {"image_size": 32, "patch_size": 16, "width": 32, "layers": 1, "head_width": 16},
               "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}})
