"""The teacher quality gate: held-out retrieval against chance, before a teacher may score a pool.

A teacher near chance still produces numbers for every score, and every downstream step would
print ``ok`` on them; the gate makes that visible and stops it. Its evidence is image->text and
text->image recall@1 and @5 among N held-out pairs of a trusted split (chance: k / N):

* a teacher the platform trained is judged on the held-out part of its own training split, with
  the figures its training report recorded from the in-memory model (bit-identical to reloading);
* any other teacher (an open_clip tag, a checkpoint) is evaluated here on the held-out slice of
  the trusted split (uid hash, as for training), at most ``max_pairs`` pairs.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from typing import Any

import torch

from curation_platform import storage
from curation_platform.embedding.loader import PixelNormaliser
from curation_platform.storage import S3Settings
from curation_platform.teachers import CONFIG_FILE, Teacher, TeacherSpec
from curation_platform.training import (
    RetrievalMetrics,
    held_out,
    load_reference,
    retrieval_metrics,
    torch_threads,
)

GATE_MODES = ("block", "warn")


@dataclass(frozen=True)
class TeacherBar:
    """What a teacher must reach on held-out pairs.

    Both directions' R@5 must reach ``min_recall_at_5`` and every recall (R@1 and R@5, both ways)
    must be at least ``min_chance_multiple`` times chance. The default 0.3 passes the demo teacher
    (R@5 ~0.67 among ~300 pairs) and fails one cut short at a tenth of its steps (~0.13).
    """

    min_recall_at_5: float = 0.3
    min_chance_multiple: float = 3.0

    def __post_init__(self) -> None:
        if not 0 <= self.min_recall_at_5 <= 1 or self.min_chance_multiple < 0:
            raise ValueError(f"min_recall_at_5 must be in [0, 1] and min_chance_multiple >= 0, got {self}")

    def shortfalls(self, metrics: RetrievalMetrics) -> list[str]:
        """Each way ``metrics`` misses the bar, in words; empty when it passes."""
        misses = []
        for direction in ("i2t", "t2i"):
            recall_at_5 = getattr(metrics, f"{direction}_recall_at_5")
            if recall_at_5 < self.min_recall_at_5:
                misses.append(f"{direction} R@5 {recall_at_5:.3f} < minimum {self.min_recall_at_5:.3f}")
            for k, chance in ((1, metrics.chance_at_1), (5, metrics.chance_at_5)):
                recall = getattr(metrics, f"{direction}_recall_at_{k}")
                if recall < self.min_chance_multiple * chance:
                    misses.append(f"{direction} R@{k} {recall:.3f} < {self.min_chance_multiple:g} x chance "
                                  f"{chance:.4f}")
        return misses


@dataclass(frozen=True)
class TeacherVerdict:
    """The gate's finding for one teacher."""

    teacher_id: str
    passed: bool
    metrics: RetrievalMetrics
    bar: TeacherBar
    split_uri: str
    evidence: str  # "training report" or "evaluated"
    shortfalls: list[str]

    @property
    def summary(self) -> str:
        m = self.metrics
        return (f"held-out retrieval on {m.samples} pairs of {self.split_uri}: i2t R@1 {m.i2t_recall_at_1:.3f} "
                f"R@5 {m.i2t_recall_at_5:.3f}, t2i R@1 {m.t2i_recall_at_1:.3f} R@5 {m.t2i_recall_at_5:.3f} "
                f"(chance {m.chance_at_1:.4f} / {m.chance_at_5:.4f}; bar R@5 >= {self.bar.min_recall_at_5:g})")

    @property
    def advice(self) -> str:
        """What to change, for a teacher that missed the bar."""
        if self.passed:
            return ""
        return ("the teacher is too weak to score a pool (" + "; ".join(self.shortfalls) + "). Give it more "
                "clean pairs to learn from (a larger trusted split via --train-on / CURATION_TEACHER_TRAIN_ON), "
                "more steps (more epochs), or use a pretrained teacher (--arch ViT-B-32 --pretrained TAG or "
                "--teacher CHECKPOINT); the bar itself is teacher.min_recall_at_5 in curation.json")

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "summary": self.summary, "advice": self.advice}


def training_report(spec: TeacherSpec, s3: S3Settings | None = None) -> dict[str, Any] | None:
    """The ``training`` record a platform-trained teacher directory carries, else None."""
    if not spec.is_directory:
        return None
    uri = storage.join(spec.checkpoint, CONFIG_FILE)
    if not storage.exists(uri, s3):
        return None
    return json.loads(storage.read_bytes(uri, s3)).get("training")


def evaluate_teacher(teacher: Teacher, split_uri: str, *, held_out_fraction: float = 0.1, seed: int = 0,
                     max_pairs: int = 1000, threads: int = 2, s3: S3Settings | None = None) -> RetrievalMetrics:
    """Retrieval of ``teacher`` on the held-out slice of ``split_uri`` (the first ``max_pairs`` of it)."""
    def in_slice(uids: list[str]) -> torch.Tensor:
        return held_out(uids, held_out_fraction, seed)

    with torch_threads(threads):
        data = load_reference(split_uri, teacher.preprocessing, teacher.tokenizer, s3, max_samples=max_pairs,
                              uid_filter=in_slice)
        if len(data.uids) < 5:
            raise ValueError(f"{split_uri}: only {len(data.uids)} held-out pairs to evaluate the teacher on")
        normalise = PixelNormaliser(teacher.preprocessing)
        images = torch.cat([teacher.encode_images(normalise(pixels).to(teacher.device)).cpu()
                            for pixels in data.pixels.split(256)])
        texts = torch.cat([teacher.encode_texts(tokens.to(teacher.device)).cpu() for tokens in data.tokens.split(256)])
    return retrieval_metrics(images, texts, data.tokens, teacher.logit_scale)


def judge_teacher(teacher: Teacher, split_uri: str, bar: TeacherBar = TeacherBar(), *,
                  s3: S3Settings | None = None, max_pairs: int = 1000) -> TeacherVerdict:
    """The gate: the training report's held-out figures where this teacher was trained by the
    platform (and the report is its own), else an evaluation on ``split_uri``'s held-out slice."""
    report = training_report(teacher.spec, s3)
    if report is not None and report.get("held_out"):
        metrics, evidence = RetrievalMetrics(**report["held_out"]), "training report"
        split_uri = report["reference_uri"]
    else:
        metrics, evidence = evaluate_teacher(teacher, split_uri, max_pairs=max_pairs, s3=s3), "evaluated"
    shortfalls = bar.shortfalls(metrics)
    return TeacherVerdict(teacher.teacher_id, not shortfalls, metrics, bar, split_uri, evidence, shortfalls)
