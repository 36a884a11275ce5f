"""Evaluation scales: the fixed training recipe every arm of an evaluation gets (DataComp-style).

Compute is the number of samples seen, never epochs: a release of 400 samples and the whole pool
of 2,000 both train for exactly ``steps`` steps of ``batch_size``, so the smaller set is repeated
more often. ``small`` and ``medium`` are DataComp's published recipes (ViT-B-32, batch 4096, lr
5e-4, 500 warm-up steps, weight decay 0.2, amp) for GPU deployments; ``demo`` is a student small
enough for a 2-core CPU, so the main job can evaluate its releases in minutes.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from typing import Any

from curation_platform.precision import resolve_precision

# A small ViT / text transformer in open_clip's model_cfg form; registered under ``DEMO_STUDENT``.
DEMO_STUDENT = "curation-demo-student"
DEMO_STUDENT_CFG: dict[str, Any] = {
    "embed_dim": 96,
    "vision_cfg": {"image_size": 32, "patch_size": 8, "width": 96, "layers": 2, "head_width": 48, "mlp_ratio": 4.0},
    "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 96, "heads": 2, "layers": 2, "mlp_ratio": 4.0},
}


@dataclass(frozen=True)
class EvalScale:
    """Everything that fixes a student's training, except the data and the seed."""

    name: str
    model: str  # an open_clip model config name
    samples_seen: int
    batch_size: int
    lr: float
    warmup_steps: int
    weight_decay: float = 0.2
    beta2: float = 0.98
    precision: str = "amp"  # open_clip_train's --precision, or "auto": bf16 autocast where native, else fp32
    checkpoints: int = 1  # open_clip_train epochs; each sees samples_seen / checkpoints samples
    workers: int = 0  # data-loading processes per trainer
    threads: int | None = None  # torch threads (CPU scales pin them: part of what fixes the weights)
    model_cfg: dict[str, Any] | None = field(default=None, hash=False)  # a custom config to register as ``model``
    seeds: int = 3  # seeds per arm unless the caller says otherwise

    def __post_init__(self) -> None:
        if self.samples_seen < self.batch_size * self.checkpoints:
            raise ValueError(f"{self.name}: samples_seen must cover at least one batch per checkpoint")
        batches = self.samples_seen / (self.batch_size * self.checkpoints)
        if batches != int(batches) or int(batches) % max(1, self.workers):
            # open_clip_train rounds an epoch up to whole batches per data worker: only such multiples are exact
            raise ValueError(f"{self.name}: samples_seen must be a multiple of batch_size x checkpoints x workers, "
                             "so every arm sees exactly the same number of samples")

    @property
    def steps(self) -> int:
        return self.samples_seen // self.batch_size

    @property
    def samples_per_checkpoint(self) -> int:
        return self.samples_seen // self.checkpoints

    def trainer_precision(self) -> str:
        """open_clip_train's ``--precision`` on this machine."""
        if self.precision != "auto":
            return self.precision
        return "amp_bf16" if resolve_precision("auto") == "bf16" else "fp32"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


SCALES: dict[str, EvalScale] = {
    "demo": EvalScale(name="demo", model=DEMO_STUDENT, samples_seen=8_192, batch_size=128, lr=2e-3, warmup_steps=8,
                      weight_decay=0.1, precision="auto", workers=1, threads=2, model_cfg=DEMO_STUDENT_CFG),
    "small": EvalScale(name="small", model="ViT-B-32", samples_seen=12_800_000, batch_size=4096, lr=5e-4,
                       warmup_steps=500, checkpoints=5, workers=5, seeds=1),
    "medium": EvalScale(name="medium", model="ViT-B-32", samples_seen=128_000_000, batch_size=4096, lr=5e-4,
                        warmup_steps=500, checkpoints=5, workers=10, seeds=1),
}


def get_scale(name: str, **overrides: Any) -> EvalScale:
    if name not in SCALES:
        raise ValueError(f"evaluation scales are {sorted(SCALES)}, got {name!r}")
    return replace(SCALES[name], **overrides)
