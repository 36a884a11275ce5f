"""The labelled defects of the demo pool: their rates, which sample gets which, and the image edits.

Counts are exact (largest-remainder rounding of rate x pool size) and assigned by one seeded
shuffle, so every kind is present even in small pools and measured shares match the configured
rates. Samples that borrow content (misaligned captions, duplicates) borrow it from clean samples,
which keeps every duplicate group anchored on a clean original.

Kinds: ``clean``, ``misaligned`` (caption of another pool sample), ``generic_caption``,
``exact_duplicate`` and ``near_duplicate`` (copies of a clean pool sample), ``text_render``,
``non_english``, ``tiny``, ``extreme_aspect``, ``undecodable``, ``failed_download``, all drawn
from their rates, and ``eval_copy``: a near copy of an image of the ``eval`` split, for measuring
decontamination. Eval copies are not rate-driven: a handful of clean pool samples (no other
sample borrows from) are converted after the plan is drawn, from a stream of their own, so
adding them moves no other sample (see ``CorruptionPlan.with_eval_copies``).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from enum import StrEnum

import numpy as np
from PIL import Image, ImageEnhance

from curation_platform.demo.attributes import pick
from curation_platform.demo.render import Size


class CorruptionKind(StrEnum):
    CLEAN = "clean"
    MISALIGNED = "misaligned"
    GENERIC_CAPTION = "generic_caption"
    EXACT_DUPLICATE = "exact_duplicate"
    NEAR_DUPLICATE = "near_duplicate"
    TEXT_RENDER = "text_render"
    NON_ENGLISH = "non_english"
    TINY = "tiny"
    EXTREME_ASPECT = "extreme_aspect"
    UNDECODABLE = "undecodable"
    FAILED_DOWNLOAD = "failed_download"
    # Keep last: plans store kinds as positions in CORRUPTION_KINDS, and the rate-driven kinds
    # before it keep their positions (and so their assignment) whether or not it exists.
    EVAL_COPY = "eval_copy"


CORRUPTION_KINDS = tuple(CorruptionKind)
# Kinds whose share of the pool is a rate; eval copies are a count, converted after assignment.
RATE_KINDS = tuple(kind for kind in CORRUPTION_KINDS if kind is not CorruptionKind.EVAL_COPY)
BORROWING_KINDS = frozenset({CorruptionKind.MISALIGNED, CorruptionKind.EXACT_DUPLICATE, CorruptionKind.NEAR_DUPLICATE})
DUPLICATE_KINDS = frozenset({CorruptionKind.EXACT_DUPLICATE, CorruptionKind.NEAR_DUPLICATE})

DOWNLOAD_ERRORS = (
    "HTTP Error 404: Not Found",
    "HTTP Error 403: Forbidden",
    "HTTP Error 500: Internal Server Error",
    "<urlopen error [Errno -2] Name or service not known>",
    "The read operation timed out",
    "<urlopen error [SSL: CERTIFICATE_VERIFY_FAILED] certificate verify failed>",
)
_HTML_ERROR_PAGE = (
    "<!DOCTYPE html>\n<html><head><title>403 Forbidden</title></head>\n"
    "<body><h1>Forbidden</h1><p>You don't have permission to access this resource.</p>\n"
    "<p>Request ID: {request_id}</p></body></html>\n"
)


@dataclass(frozen=True)
class CorruptionRates:
    """Share of the pool given each defect; whatever is left over stays clean."""

    misaligned: float = 0.08
    generic_caption: float = 0.05
    exact_duplicate: float = 0.03
    near_duplicate: float = 0.03
    text_render: float = 0.03
    non_english: float = 0.05
    tiny: float = 0.015
    extreme_aspect: float = 0.01
    undecodable: float = 0.007
    failed_download: float = 0.03

    def __post_init__(self) -> None:
        for field in fields(self):
            rate = getattr(self, field.name)
            if not 0.0 <= rate <= 1.0:
                raise ValueError(f"rate {field.name}={rate} is not within [0, 1]")
        if self.total > 1.0:
            raise ValueError(f"corruption rates add up to {self.total:.3f} > 1")

    @property
    def total(self) -> float:
        return float(sum(getattr(self, field.name) for field in fields(self)))

    def rate(self, kind: CorruptionKind) -> float:
        """Share of ``kind`` in the plan as assigned; 0 for ``eval_copy``, which is not rate-driven."""
        if kind is CorruptionKind.EVAL_COPY:
            return 0.0
        return 1.0 - self.total if kind is CorruptionKind.CLEAN else float(getattr(self, kind.value))

    def to_dict(self) -> dict[str, float]:
        return asdict(self)


def exact_counts(rates: CorruptionRates, samples: int) -> dict[CorruptionKind, int]:
    """Per-kind sample counts summing to ``samples``, each as close to rate x samples as possible.

    Only the rate-driven kinds (``RATE_KINDS``) are listed; eval copies are counted separately.
    """
    wanted = np.array([rates.rate(kind) * samples for kind in RATE_KINDS])
    counts = np.floor(wanted).astype(np.int64)
    shortfall = samples - int(counts.sum())
    # Largest remainders first; ties go to the kind listed first, which keeps the result stable.
    for position in np.argsort(-(wanted - counts), kind="stable")[:shortfall]:
        counts[position] += 1
    return {kind: int(count) for kind, count in zip(RATE_KINDS, counts, strict=True)}


@dataclass(frozen=True)
class CorruptionPlan:
    """Per pool sample (from global index ``offset`` on): its defect, and whose content it borrows."""

    offset: int
    kinds: np.ndarray  # uint8 positions in CORRUPTION_KINDS
    # int64 global index of the borrowed clean pool sample (index in the eval split for an eval
    # copy), -1 if none
    sources: np.ndarray
    duplicated: np.ndarray  # bool: a clean sample that has at least one duplicate

    @classmethod
    def assign(cls, rates: CorruptionRates, samples: int, rng: np.random.Generator) -> CorruptionPlan:
        counts = exact_counts(rates, samples)
        # RATE_KINDS is a prefix of CORRUPTION_KINDS, so these positions are CORRUPTION_KINDS positions.
        kinds = np.repeat(np.arange(len(RATE_KINDS), dtype=np.uint8), [counts[kind] for kind in RATE_KINDS])
        kinds = kinds[rng.permutation(samples)]
        clean = np.flatnonzero(kinds == CORRUPTION_KINDS.index(CorruptionKind.CLEAN))
        borrowing = np.isin(kinds, [CORRUPTION_KINDS.index(kind) for kind in BORROWING_KINDS])
        if borrowing.any() and clean.size == 0:
            raise ValueError("misaligned captions and duplicates need at least one clean pool sample to borrow from")
        sources = np.full(samples, -1, dtype=np.int64)
        sources[borrowing] = clean[rng.integers(0, max(clean.size, 1), size=int(borrowing.sum()))]
        duplicates = np.isin(kinds, [CORRUPTION_KINDS.index(kind) for kind in DUPLICATE_KINDS])
        duplicated = np.zeros(samples, dtype=bool)
        duplicated[sources[duplicates]] = True
        return cls(offset=0, kinds=kinds, sources=sources, duplicated=duplicated)

    def with_eval_copies(self, copies: int, eval_samples: int, rng: np.random.Generator) -> CorruptionPlan:
        """This plan with up to ``copies`` clean samples turned into near copies of eval images.

        Only clean samples that no other sample borrows from (no misaligned caption, no duplicate)
        are converted, each to a distinct eval index drawn without replacement from
        ``range(eval_samples)``, stored in ``sources``. Every other sample keeps its defect and source.
        """
        if self.offset != 0:
            raise ValueError("eval copies are assigned on the whole plan, not on a shard's window")
        clean = self.kinds == CORRUPTION_KINDS.index(CorruptionKind.CLEAN)
        borrowing = np.isin(self.kinds, [CORRUPTION_KINDS.index(kind) for kind in BORROWING_KINDS])
        borrowed = np.zeros(self.kinds.size, dtype=bool)
        borrowed[self.sources[borrowing]] = True
        candidates = np.flatnonzero(clean & ~borrowed & ~self.duplicated)
        copies = min(copies, eval_samples, candidates.size)
        if copies <= 0:
            return self
        positions = np.sort(rng.choice(candidates, size=copies, replace=False))
        kinds, sources = self.kinds.copy(), self.sources.copy()
        kinds[positions] = CORRUPTION_KINDS.index(CorruptionKind.EVAL_COPY)
        sources[positions] = rng.choice(eval_samples, size=copies, replace=False)
        return CorruptionPlan(self.offset, kinds, sources, self.duplicated)

    def window(self, start: int, stop: int) -> CorruptionPlan:
        """The part of the plan one shard needs, still addressed by global index."""
        local = slice(start - self.offset, stop - self.offset)
        return CorruptionPlan(start, self.kinds[local], self.sources[local], self.duplicated[local])

    def kind(self, index: int) -> CorruptionKind:
        return CORRUPTION_KINDS[int(self.kinds[index - self.offset])]

    def source(self, index: int) -> int:
        return int(self.sources[index - self.offset])

    def is_duplicated(self, index: int) -> bool:
        return bool(self.duplicated[index - self.offset])


def near_duplicate_of(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    """The same picture after a re-upload: slightly cropped, rescaled and colour-shifted."""
    width, height = image.size
    left, top, right, bottom = rng.uniform(0.0, 0.04, size=4)
    cropped = image.crop(
        (round(left * width), round(top * height), round(width * (1 - right)), round(height * (1 - bottom)))
    )
    scale = rng.uniform(0.92, 1.08)
    new_size = (max(1, round(cropped.width * scale)), max(1, round(cropped.height * scale)))
    resized = cropped.resize(new_size, Image.Resampling.BICUBIC)
    brightened = ImageEnhance.Brightness(resized).enhance(rng.uniform(0.92, 1.08))
    return ImageEnhance.Contrast(brightened).enhance(rng.uniform(0.94, 1.06))


def shrink_to_tiny(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    """A thumbnail-sized copy: 40% of the time icon-sized (8-24 px long side), else 40-120 px."""
    long_side = int(rng.integers(8, 25)) if rng.random() < 0.4 else int(rng.integers(40, 121))
    scale = long_side / max(image.size)
    new_size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    return image.resize(new_size, Image.Resampling.BILINEAR)


def extreme_aspect_size(rng: np.random.Generator) -> Size:
    """A banner (three times in four) or a tall strip, with a side ratio between 4.5 and 8."""
    short = int(rng.integers(48, 141))
    long = round(short * rng.uniform(4.5, 8.0))
    return (long, short) if rng.random() < 0.75 else (short, long)


def undecodable_bytes(jpeg: bytes, rng: np.random.Generator) -> tuple[bytes, str]:
    """Bytes served as an image that no decoder accepts, and which way they are broken.

    ``truncated_jpeg`` keeps a valid header (``Image.open`` succeeds, ``load()`` fails),
    ``random_bytes`` has no image signature at all, ``html_page`` is an error page.
    """
    variant = pick(rng, ("truncated_jpeg", "random_bytes", "html_page"))
    if variant == "truncated_jpeg":
        return jpeg[: round(len(jpeg) * rng.uniform(0.2, 0.6))], variant
    if variant == "random_bytes":
        return rng.bytes(int(rng.integers(500, 5000))), variant
    # A per-request id keeps these pages from all sharing one sha256 (they are not duplicates).
    return _HTML_ERROR_PAGE.format(request_id=rng.bytes(8).hex()).encode("ascii"), variant


def download_error(rng: np.random.Generator) -> str:
    """An error message as img2dataset records it for a failed download."""
    return pick(rng, DOWNLOAD_ERRORS)

