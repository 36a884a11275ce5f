"""Teacher training: a small CLIP learned from scratch on a trusted reference split.

This is the idea behind data-filtering networks: where no public CLIP fits a domain, a small
contrastive model trained on clean, in-domain pairs is a better filter than a large generic one.
The reference split is validated with the library's own ingestion (quarantined samples never
reach training), every accepted image is decoded once, with exactly the preprocessing the
embedding engine will use, into one in-memory uint8 tensor, and captions are tokenized once.
Training is open_clip's recipe at small scale: symmetric InfoNCE with a learnable logit scale
(clamped at ln 100), AdamW without decay on gains/biases, linear warmup then cosine decay. A
held-out part of the split, chosen by uid hash, measures retrieval against chance. The result is
an open_clip ``local-dir`` teacher directory that :func:`~curation_platform.teachers.load_teacher`
reads back bit-exactly.

A run is defined by its steps, never by the clock: the same split, config and seed give the same
weights on the same CPU capability whatever else the machine is doing (``threads`` is fixed by the
config, and the float kernels are deterministic for a given thread count). Precision follows the
hardware: bf16 autocast only where the CPU computes bf16 natively (AVX512-BF16 or AMX), fp32
elsewhere, since emulated bf16 is an order of magnitude slower; the resolved choice is recorded in
the teacher's config. A time limit, when one is set, is a guard: a run that would be cut short
raises :class:`TrainingTimeLimitExceeded` and publishes nothing. Memory holds the split (3 x S x S
bytes a sample: 12 KiB at S = 64), at most ``max_samples`` of it.
"""

from __future__ import annotations

import hashlib
import math
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import pyarrow as pa
import torch
import torch.nn.functional as F

from curation_platform.embedding.loader import ChunkDataset, ImagePreprocessor, PixelNormaliser, plan_chunks
from curation_platform.ingest import ingest_shard
from curation_platform.pool import discover_shards
from curation_platform.precision import PRECISIONS, cpu_description, resolve_precision
from curation_platform.storage import S3Settings
from curation_platform.teachers import Preprocessing, TeacherSpec, load_teacher, save_teacher_directory

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
RECALL_KS = (1, 5)
_DECODE_CHUNK = 256
_EVAL_BATCH = 512

PROGRESS_EVERY_STEPS = 10  # a "step" progress event every this many steps (and at the last one)

# Called with one event dict per stage: "loading" (decoding the split starts), "data" (split decoded:
# pair counts, total_steps, max_samples), "step" (every PROGRESS_EVERY_STEPS: step, epoch of epochs,
# loss, seconds_left), "epoch" (an EpochStats point of the loss curve) and "saved" (teacher_id).
ProgressCallback = Callable[[dict[str, Any]], None]


class TrainingTimeLimitExceeded(RuntimeError):
    """A run set a time limit and reached it before its last step: the teacher is not published."""


@dataclass(frozen=True)
class ModelConfig:
    """A small open_clip ``CLIP``: ViT image tower, causal text transformer, OpenAI BPE vocabulary."""

    embed_dim: int = 128
    image_size: int = 64
    patch_size: int = 8
    vision_width: int = 128
    vision_layers: int = 3
    vision_head_width: int = 64
    context_length: int = 32
    vocab_size: int = 49408
    text_width: int = 128
    text_heads: int = 2
    text_layers: int = 2
    mlp_ratio: float = 4.0

    def model_cfg(self) -> dict[str, Any]:
        """open_clip's ``model_cfg`` (what ``open_clip_config.json`` stores)."""
        return {
            "embed_dim": self.embed_dim,
            "vision_cfg": {
                "image_size": self.image_size,
                "patch_size": self.patch_size,
                "width": self.vision_width,
                "layers": self.vision_layers,
                "head_width": self.vision_head_width,
                "mlp_ratio": self.mlp_ratio,
            },
            "text_cfg": {
                "context_length": self.context_length,
                "vocab_size": self.vocab_size,
                "width": self.text_width,
                "heads": self.text_heads,
                "layers": self.text_layers,
                "mlp_ratio": self.mlp_ratio,
            },
        }

    def preprocess_cfg(self) -> dict[str, Any]:
        """open_clip's ``preprocess_cfg``: resize the short side, centre-crop, OpenAI statistics."""
        return {
            "size": self.image_size,
            "mean": list(OPENAI_MEAN),
            "std": list(OPENAI_STD),
            "interpolation": "bicubic",
            "resize_mode": "shortest",
        }


@dataclass(frozen=True)
class TrainingConfig:
    """Everything that determines a training run (and, for a fixed CPU, its weights)."""

    model: ModelConfig = ModelConfig()
    epochs: int = 15
    batch_size: int = 128
    lr: float = 1e-3
    weight_decay: float = 0.1
    warmup_steps: int = 40
    beta1: float = 0.9
    beta2: float = 0.98
    eps: float = 1e-6
    crop_scale: tuple[float, float] = (0.7, 1.0)  # random resized crop (area); (1, 1) turns it off
    precision: str = "auto"  # autocast of training steps: auto (native bf16, else fp32), bf16 or fp32
    seed: int = 0
    held_out_fraction: float = 0.1
    max_samples: int | None = 200_000  # the split's first accepted samples in shard order (memory bound)
    max_seconds: float | None = None  # a guard, not a budget: reaching it before the last step is an error
    threads: int = 2

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.batch_size < 2:
            raise ValueError("epochs must be >= 1 and batch_size >= 2")
        if not 0 < self.held_out_fraction < 1:
            raise ValueError(f"held_out_fraction must be in (0, 1), got {self.held_out_fraction}")
        if not 0 < self.crop_scale[0] <= self.crop_scale[1] <= 1:
            raise ValueError(f"crop_scale must satisfy 0 < low <= high <= 1, got {self.crop_scale}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {self.precision!r}")
        if self.threads < 1 or (self.max_seconds is not None and self.max_seconds <= 0):
            raise ValueError("threads must be >= 1 and max_seconds > 0 (or None)")
        if self.max_samples is not None and self.max_samples < 2 * self.batch_size:
            raise ValueError(f"max_samples must be at least 2 x batch_size, got {self.max_samples}")

    def resolved(self) -> TrainingConfig:
        """This config with ``precision`` resolved for this machine (what a teacher records)."""
        return replace(self, precision=resolve_precision(self.precision))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class ReferenceData:
    """A decoded reference split: uint8 pixels (N, 3, S, S) and tokens (N, context), in tar order."""

    uids: list[str]
    pixels: torch.Tensor
    tokens: torch.Tensor
    shards: int
    quarantined: int

    def subset(self, mask: torch.Tensor) -> ReferenceData:
        uids = [uid for uid, keep in zip(self.uids, mask.tolist(), strict=True) if keep]
        return ReferenceData(uids, self.pixels[mask], self.tokens[mask], self.shards, self.quarantined)


@dataclass(frozen=True)
class RetrievalMetrics:
    """Held-out retrieval among N pairs: recall@k both ways, chance k / N, mean InfoNCE loss."""

    samples: int
    loss: float
    i2t_recall_at_1: float
    i2t_recall_at_5: float
    t2i_recall_at_1: float
    t2i_recall_at_5: float
    chance_at_1: float
    chance_at_5: float


@dataclass(frozen=True)
class EpochStats:
    """One point of the loss curve (``seconds`` since training began: for reading, never for control)."""

    epoch: int
    steps: int
    train_loss: float
    held_out_loss: float
    logit_scale: float
    lr: float
    seconds: float


@dataclass(frozen=True)
class TrainingReport:
    """What a run did and how good the teacher is; stored in the teacher directory as ``training``."""

    reference_uri: str
    out_uri: str
    teacher_id: str
    shards: int
    samples_train: int
    samples_held_out: int
    quarantined: int
    epochs_run: float
    steps: int
    precision: str
    cpu: dict[str, Any]
    seconds_data: float
    seconds_train: float
    seconds_total: float
    final_train_loss: float
    logit_scale: float
    held_out: RetrievalMetrics
    curve: list[EpochStats]
    config: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def train_teacher(
    reference_uri: str,
    out_uri: str,
    config: TrainingConfig = TrainingConfig(),
    progress: ProgressCallback | None = None,
    *,
    s3: S3Settings | None = None,
) -> TrainingReport:
    """Train a teacher on the reference split at ``reference_uri`` and write it to ``out_uri``.

    Raises :class:`TrainingTimeLimitExceeded` (writing nothing) when ``config.max_seconds`` is set
    and training would not finish within it. ``progress`` hears each stage (:data:`ProgressCallback`).
    """
    notify = progress or (lambda event: None)
    config = config.resolved()
    started = time.perf_counter()
    notify({"stage": "loading", "reference_uri": reference_uri})
    preprocessing = Preprocessing.from_open_clip(config.model.preprocess_cfg())
    with torch_threads(config.threads), torch.random.fork_rng(devices=[]):
        data = load_reference(reference_uri, preprocessing, _tokenizer(config.model), s3, config.max_samples)
        held_out_mask = held_out(data.uids, config.held_out_fraction, config.seed)
        train, evaluation = data.subset(~held_out_mask), data.subset(held_out_mask)
        if len(train.uids) < config.batch_size or len(evaluation.uids) < max(RECALL_KS):
            raise ValueError(f"{reference_uri}: {len(train.uids)} training / {len(evaluation.uids)} held-out samples; "
                             f"need at least batch_size={config.batch_size} / {max(RECALL_KS)}")
        seconds_data = time.perf_counter() - started
        steps_per_epoch = len(train.uids) // config.batch_size
        notify({"stage": "data", "train": len(train.uids), "held_out": len(evaluation.uids),
                "quarantined": data.quarantined, "seconds": round(seconds_data, 2),
                "total_steps": steps_per_epoch * config.epochs, "precision": config.precision,
                "max_samples": config.max_samples})

        torch.manual_seed(config.seed)
        model = create_model(config.model)
        normalise = PixelNormaliser(preprocessing)
        deadline = None if config.max_seconds is None else started + config.max_seconds
        curve = fit(model, train, evaluation, normalise, config, notify, deadline)
        metrics = evaluate(model, evaluation, normalise)
    seconds_total = time.perf_counter() - started
    steps = sum(epoch.steps for epoch in curve)
    report = TrainingReport(
        reference_uri=reference_uri,
        out_uri=out_uri,
        teacher_id="",
        shards=data.shards,
        samples_train=len(train.uids),
        samples_held_out=len(evaluation.uids),
        quarantined=data.quarantined,
        epochs_run=round(steps / steps_per_epoch, 3),
        steps=steps,
        precision=config.precision,
        cpu=cpu_description(),
        seconds_data=round(seconds_data, 2),
        seconds_train=round(seconds_total - seconds_data, 2),
        seconds_total=round(seconds_total, 2),
        final_train_loss=curve[-1].train_loss,
        logit_scale=float(model.logit_scale.detach().exp()),
        held_out=metrics,
        curve=curve,
        config=config.to_dict(),
    )
    training = {key: value for key, value in report.to_dict().items() if key != "teacher_id"}
    save_teacher_directory(model, config.model.model_cfg(), config.model.preprocess_cfg(), out_uri,
                           extra={"training": training}, s3=s3)
    teacher_id = load_teacher(TeacherSpec(checkpoint=out_uri), s3=s3).teacher_id
    notify({"stage": "saved", "out": out_uri, "teacher_id": teacher_id})
    return replace(report, teacher_id=teacher_id)


def load_reference(reference_uri: str, preprocessing: Preprocessing, tokenizer: Any,
                   s3: S3Settings | None = None, max_samples: int | None = None,
                   uid_filter: Callable[[list[str]], torch.Tensor] | None = None) -> ReferenceData:
    """Validate the shards in order, then decode their accepted samples once, exactly as the engine
    would; ``uid_filter`` (uids -> keep mask) narrows them first, and with ``max_samples`` only the
    first that many are kept (shards past them are not read)."""
    shards = discover_shards(reference_uri, s3=s3)
    if not shards:
        raise FileNotFoundError(f"no shards at {reference_uri}")
    chunks = []
    quarantined = accepted = read = 0
    for job, shard in enumerate(shards):
        if max_samples is not None and accepted >= max_samples:
            break
        ingestion = ingest_shard(shard, s3=s3)
        read += 1
        quarantined += ingestion.report.quarantined
        samples = ingestion.accepted
        if uid_filter is not None and samples.num_rows:
            samples = samples.filter(pa.array(uid_filter(samples.column("uid").to_pylist()).numpy()))
        if max_samples is not None:
            samples = samples.slice(0, max_samples - accepted)
        accepted += samples.num_rows
        if shard.tar is not None and samples.num_rows:
            chunks += plan_chunks(job, shard.tar.uri, samples, _DECODE_CHUNK)
    if not chunks:
        raise ValueError(f"{reference_uri}: no accepted samples")
    dataset = ChunkDataset(chunks, ImagePreprocessor(preprocessing), tokenizer, s3)
    items = [dataset[index] for index in range(len(dataset))]
    return ReferenceData(
        uids=[uid for item in items for uid in item["uids"]],
        pixels=torch.cat([item["pixels"] for item in items]),
        tokens=torch.cat([item["tokens"] for item in items]),
        shards=read,
        quarantined=quarantined,
    )


def held_out(uids: list[str], fraction: float, seed: int) -> torch.Tensor:
    """Boolean mask of held-out samples: a uid's side depends only on (uid, seed), not on position
    or on which other samples exist, so growing the reference split never moves a sample across."""
    threshold = int(fraction * 2**64)
    return torch.tensor([
        int.from_bytes(hashlib.sha256(f"{seed}\0{uid}".encode()).digest()[:8], "big") < threshold for uid in uids
    ], dtype=torch.bool)


def create_model(config: ModelConfig) -> torch.nn.Module:
    """A randomly initialised open_clip ``CLIP`` (seed the global RNG first for reproducibility)."""
    from open_clip.model import CLIP

    return CLIP(**config.model_cfg())


def _tokenizer(config: ModelConfig) -> Any:
    """open_clip's BPE tokenizer, as ``get_tokenizer("local-dir:...")`` builds it for the saved teacher."""
    from open_clip.tokenizer import SimpleTokenizer

    return SimpleTokenizer(context_length=config.context_length)


def fit(model: torch.nn.Module, train: ReferenceData, evaluation: ReferenceData, normalise: PixelNormaliser,
        config: TrainingConfig, notify: ProgressCallback, deadline: float | None = None) -> list[EpochStats]:
    """Train in place for exactly ``epochs`` epochs; returns the per-epoch curve.

    The clock is read only to report progress and to enforce ``deadline`` (raising, never stopping
    early), so the weights are a function of the data, the config and the seed.
    """
    steps_per_epoch = train.pixels.shape[0] // config.batch_size
    total_steps = steps_per_epoch * config.epochs
    optimizer = _optimizer(model, config)
    generator = torch.Generator().manual_seed(config.seed)
    started = time.perf_counter()
    curve: list[EpochStats] = []
    step = 0
    for epoch in range(config.epochs):
        model.train()
        order = torch.randperm(train.pixels.shape[0], generator=generator)
        losses = []
        for batch in order[: steps_per_epoch * config.batch_size].split(config.batch_size):
            lr = cosine_lr(step, total_steps, config.warmup_steps, config.lr)
            for group in optimizer.param_groups:
                group["lr"] = lr
            pixels = random_resized_crop(normalise(train.pixels[batch]), config.crop_scale, generator)
            losses.append(_train_step(model, optimizer, pixels, train.tokens[batch], config.precision))
            step += 1
            now = time.perf_counter()
            if deadline is not None and now > deadline and step < total_steps:
                raise TrainingTimeLimitExceeded(
                    f"training reached max_seconds={config.max_seconds:g} after {step} of {total_steps} steps "
                    f"(precision {config.precision}, {config.threads} threads); nothing was published. Raise or "
                    "remove the limit, train fewer epochs, or run on a less loaded machine")
            if step % PROGRESS_EVERY_STEPS == 0 or step == total_steps:
                rate = step / max(now - started, 1e-9)
                notify({"stage": "step", "step": step, "total_steps": total_steps, "epoch": epoch + 1,
                        "epochs": config.epochs, "loss": losses[-1], "steps_per_second": rate,
                        "seconds_left": (total_steps - step) / rate})
        stats = EpochStats(
            epoch=epoch + 1,
            steps=len(losses),
            train_loss=sum(losses) / len(losses),
            held_out_loss=evaluate(model, evaluation, normalise).loss,
            logit_scale=float(model.logit_scale.detach().exp()),
            lr=lr,
            seconds=round(time.perf_counter() - started, 2),
        )
        curve.append(stats)
        notify({"stage": "epoch", "epochs": config.epochs, **asdict(stats)})
    return curve


def _optimizer(model: torch.nn.Module, config: TrainingConfig) -> torch.optim.Optimizer:
    """AdamW; gains, biases, norms and the logit scale are not decayed (open_clip's rule)."""
    def exclude(name: str, param: torch.nn.Parameter) -> bool:
        return param.ndim < 2 or "bn" in name or "ln" in name or "bias" in name or "logit_scale" in name

    named = [(name, param) for name, param in model.named_parameters() if param.requires_grad]
    groups = [
        {"params": [param for name, param in named if exclude(name, param)], "weight_decay": 0.0},
        {"params": [param for name, param in named if not exclude(name, param)], "weight_decay": config.weight_decay},
    ]
    return torch.optim.AdamW(groups, lr=config.lr, betas=(config.beta1, config.beta2), eps=config.eps)


def cosine_lr(step: int, total_steps: int, warmup_steps: int, base_lr: float) -> float:
    """open_clip's schedule: linear warmup to ``base_lr``, then cosine decay to zero."""
    if step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return 0.5 * (1 + math.cos(math.pi * progress)) * base_lr


def random_resized_crop(pixels: torch.Tensor, scale: tuple[float, float], generator: torch.Generator) -> torch.Tensor:
    """Zoom into a random box covering ``scale`` of the area (aspect 3/4..4/3), batched via one
    ``grid_sample``. No flips: captions say "left" and "right", and glyphs are not symmetric."""
    if scale == (1.0, 1.0):
        return pixels
    count = pixels.shape[0]
    area = scale[0] + (scale[1] - scale[0]) * torch.rand(count, generator=generator)
    log_ratio = math.log(3 / 4) + (math.log(4 / 3) - math.log(3 / 4)) * torch.rand(count, generator=generator)
    width = (area * log_ratio.exp()).sqrt().clamp(max=1.0)
    height = (area / log_ratio.exp()).sqrt().clamp(max=1.0)
    shift = (2 * torch.rand(count, 2, generator=generator) - 1) * (1 - torch.stack([width, height], dim=1))
    theta = torch.zeros(count, 2, 3)
    theta[:, 0, 0], theta[:, 1, 1], theta[:, :, 2] = width, height, shift
    grid = F.affine_grid(theta, list(pixels.shape), align_corners=False)
    return F.grid_sample(pixels, grid, mode="bilinear", padding_mode="border", align_corners=False)


def _train_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, pixels: torch.Tensor,
                tokens: torch.Tensor, precision: str) -> float:
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
        images, texts, logit_scale = model(pixels, tokens)
    loss = contrastive_loss(images.float(), texts.float(), logit_scale.float())
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    with torch.no_grad():
        model.logit_scale.clamp_(0, math.log(100))
    return float(loss.detach())


def contrastive_loss(images: torch.Tensor, texts: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE over a batch of normalised pairs (CLIP's loss)."""
    logits = logit_scale * images @ texts.T
    labels = torch.arange(images.shape[0])
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2


@torch.no_grad()
def embed(model: torch.nn.Module, data: ReferenceData, normalise: PixelNormaliser) -> tuple[torch.Tensor, torch.Tensor]:
    """L2-normalised fp32 image and text embeddings, in eval mode, batch by batch."""
    model.eval()
    images = [F.normalize(model.encode_image(normalise(pixels)).float(), dim=-1)
              for pixels in data.pixels.split(_EVAL_BATCH)]
    texts = [F.normalize(model.encode_text(tokens).float(), dim=-1) for tokens in data.tokens.split(_EVAL_BATCH)]
    return torch.cat(images), torch.cat(texts)


def evaluate(model: torch.nn.Module, data: ReferenceData, normalise: PixelNormaliser) -> RetrievalMetrics:
    images, texts = embed(model, data, normalise)
    return retrieval_metrics(images, texts, data.tokens, float(model.logit_scale.detach().exp()))


def retrieval_metrics(images: torch.Tensor, texts: torch.Tensor, tokens: torch.Tensor,
                      logit_scale: float) -> RetrievalMetrics:
    """Recall@k over all N held-out pairs at once (an N x N score matrix: fine up to ~10^4 pairs).

    Samples with identical captions are interchangeable (their texts embed identically), so any of
    them counts as a correct match; every other candidate scoring at least as high as the best
    correct one ranks above it, so a collapsed model (all scores tied) scores zero, not one.
    """
    count = images.shape[0]
    scores = images @ texts.T
    caption_ids = torch.unique(tokens, dim=0, return_inverse=True)[1]
    same_caption = caption_ids[:, None] == caption_ids[None, :]
    i2t_rank = _ranks(scores, same_caption)
    t2i_rank = _ranks(scores.T, same_caption)
    loss = contrastive_loss(images, texts, torch.tensor(logit_scale))
    recall = {f"{name}_recall_at_{k}": int((rank < k).sum()) / count
              for name, rank in (("i2t", i2t_rank), ("t2i", t2i_rank)) for k in RECALL_KS}
    return RetrievalMetrics(
        samples=count,
        loss=float(loss),
        chance_at_1=1 / count,
        chance_at_5=5 / count,
        **recall,
    )


def _ranks(scores: torch.Tensor, correct: torch.Tensor) -> torch.Tensor:
    """Per query row: how many wrong candidates score >= the best correct candidate."""
    best = scores.masked_fill(~correct, float("-inf")).max(dim=1, keepdim=True).values
    return ((scores >= best) & ~correct).sum(dim=1)


@contextmanager
def torch_threads(threads: int) -> Iterator[None]:
    """Fix intra-op threads for the run (float results depend on them), then restore the caller's."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)
