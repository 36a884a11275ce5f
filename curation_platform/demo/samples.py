"""One demo sample from its address alone: (seed, split, index) fixes every byte of it.

Each sample draws from its own random streams, seeded by its address, so a sample comes out the
same whichever process generates it and in whatever order, and any sample can be regenerated on
demand: that is how a duplicate copies its original, or a misaligned sample borrows a caption,
without the pool ever being held in memory. An eval copy regenerates its ``eval`` sample the same
way, so the pool holds a near copy of an evaluation image without reading the eval split.
"""

from __future__ import annotations

import hashlib
import io
import json
from dataclasses import asdict, dataclass, replace
from enum import IntEnum

import numpy as np
from PIL import Image

from curation_platform.demo.attributes import DOMAINS, Attributes, domain_of, pick, sample_attributes
from curation_platform.demo.captions import describe, generic_caption, underspecified_caption
from curation_platform.demo.corruptions import (
    CorruptionKind,
    CorruptionPlan,
    download_error,
    extreme_aspect_size,
    near_duplicate_of,
    shrink_to_tiny,
    undecodable_bytes,
)
from curation_platform.demo.evaluation import EvalLabel, eval_label
from curation_platform.demo.render import Size, render, render_text
from curation_platform.demo.vocabulary import TRANSLATED_LANGUAGES
from curation_platform.formats.img2dataset import ImageFormat
from curation_platform.layout import DEMO_SPLITS

SPLITS = DEMO_SPLITS  # a split's index seeds its random streams
PNG_SHARE = 0.08
_URL_HOSTS = (
    "images.example-cdn.invalid",
    "static.shopfront.invalid",
    "media.blogspace.invalid",
    "cdn.photohost.invalid",
    "assets.newsportal.invalid",
)
_URL_PATHS = ("wp-content/uploads/2021/04", "images/products", "media/cache/large", "photos", "uploads/img")


class Stream(IntEnum):
    """Independent random streams of one sample (and of a split's corruption plan)."""

    CONTENT = 0  # domain, attributes, size, encoding, caption: cheap, no pixels
    RENDER = 1  # layout jitter inside the renderer
    CORRUPTION = 2  # everything a defect decides
    PLAN = 3  # the split-wide corruption assignment (index 0)
    CAPTION = 4  # whether a clean sample of a split with an under-specified share gets one
    EVAL_COPIES = 5  # which clean pool samples become near copies of eval images (index 0)


def stream_rng(seed: int, split: str, stream: Stream, index: int = 0) -> np.random.Generator:
    # Fixed-length entropy: numpy treats [a, b] and [a, b, 0] alike, so never vary the length.
    return np.random.default_rng([seed, SPLITS.index(split), int(stream), index])


@dataclass(frozen=True)
class SampleAddress:
    seed: int
    split: str
    index: int

    def rng(self, stream: Stream) -> np.random.Generator:
        return stream_rng(self.seed, self.split, stream, self.index)

    @property
    def uid(self) -> str:
        """32 lowercase hex digits, DataComp style; unique across seeds, splits and indices."""
        address = f"curation-platform-demo/{self.seed}/{self.split}/{self.index}".encode()
        return hashlib.blake2b(address, digest_size=16).hexdigest()

    def url(self, image_format: ImageFormat) -> str:
        uid = self.uid
        host = _URL_HOSTS[int(uid[0:2], 16) % len(_URL_HOSTS)]
        path = _URL_PATHS[int(uid[2:4], 16) % len(_URL_PATHS)]
        return f"https://{host}/{path}/{uid[:12]}.{image_format}"


@dataclass(frozen=True)
class DomainMix:
    """Which domains a split draws its samples from, and how often."""

    domains: tuple[str, ...]
    weights: tuple[float, ...]

    @classmethod
    def uniform(cls, domains: tuple[str, ...]) -> DomainMix:
        return cls(domains, tuple(1.0 / len(domains) for _ in domains))

    def draw(self, rng: np.random.Generator) -> str:
        return self.domains[int(rng.choice(len(self.domains), p=self.weights))]


# The eval split's mix (its labels pin the domain, so it only matters for unlabelled draws).
EVAL_DOMAIN_MIX = DomainMix.uniform(DOMAINS)


@dataclass(frozen=True)
class Content:
    """A clean sample before pixels: what it shows, its caption, and how it is stored."""

    attributes: Attributes
    caption: str
    size: Size
    image_format: ImageFormat
    jpeg_quality: int


@dataclass(frozen=True)
class EncodedImage:
    data: bytes
    image_format: ImageFormat
    width: int
    height: int


@dataclass(frozen=True)
class GeneratedSample:
    """A sample as the pool stores it, plus the ground truth about it."""

    uid: str
    url: str
    caption: str
    attributes: Attributes
    corruption: CorruptionKind
    language: str | None
    # uid of the clean original, on it and on its duplicates (pool-internal only: None on eval copies)
    duplicate_group: str | None
    # misaligned: caption source uid; undecodable: the variant; generic caption: its flavour
    # ("boilerplate" or "underspecified"); eval copy: uid of the copied eval sample; a clean sample
    # with a true but under-specified caption (reference split only): "underspecified"
    corruption_detail: str | None
    image: EncodedImage | None  # None when the download failed
    error_message: str | None

    @property
    def domain(self) -> str:
        return domain_of(self.attributes)

    @property
    def attributes_json(self) -> str:
        return json.dumps(asdict(self.attributes), sort_keys=True)


def draw_size(rng: np.random.Generator) -> Size:
    """Mostly 180-320 px a side, so a minimum-side filter at 200 px removes a real share."""
    side = int(rng.integers(180, 321))
    other = int(np.clip(round(side * rng.uniform(0.8, 1.25)), 160, 360))
    return (side, other) if rng.random() < 0.5 else (other, side)


def draw_content(address: SampleAddress, mix: DomainMix, label: EvalLabel | None = None) -> Content:
    rng = address.rng(Stream.CONTENT)
    domain = label.domain if label else mix.draw(rng)
    attributes = sample_attributes(domain, rng, label.primary if label else None)
    size = draw_size(rng)
    image_format: ImageFormat = "png" if rng.random() < PNG_SHARE else "jpg"
    quality = int(rng.integers(60, 96))
    return Content(attributes, describe(attributes, rng), size, image_format, quality)


def encode(image: Image.Image, image_format: ImageFormat, jpeg_quality: int) -> EncodedImage:
    buffer = io.BytesIO()
    if image_format == "png":
        image.save(buffer, format="PNG")
    else:
        image.save(buffer, format="JPEG", quality=jpeg_quality)
    return EncodedImage(buffer.getvalue(), image_format, image.width, image.height)


def render_content(address: SampleAddress, content: Content, size: Size | None = None) -> Image.Image:
    return render(content.attributes, size or content.size, address.rng(Stream.RENDER))


def generate_sample(
    address: SampleAddress,
    mix: DomainMix,
    plan: CorruptionPlan | None = None,
    label: EvalLabel | None = None,
    underspecified_share: float = 0.0,
) -> GeneratedSample:
    """The sample at ``address``; ``plan`` (pool only) decides its defect, ``label`` (eval only) its class.

    ``underspecified_share`` (reference split only): the probability that a clean sample's caption is
    replaced by a true but under-specified one ("some geometric shapes", "a red shape"), as web
    alt-text often is. Such a sample stays clean (its caption is aligned with its image); the ground
    truth records ``corruption_detail = "underspecified"``. The draw has its own stream, so images and
    every other caption are the same whatever the share.
    """
    content = draw_content(address, mix, label)
    kind = plan.kind(address.index) if plan else CorruptionKind.CLEAN
    duplicated = plan is not None and plan.is_duplicated(address.index)
    rng = address.rng(Stream.CORRUPTION)
    sample = GeneratedSample(
        uid=address.uid,
        url=address.url(content.image_format),
        caption=content.caption,
        attributes=content.attributes,
        corruption=kind,
        language="en",
        duplicate_group=address.uid if duplicated else None,
        corruption_detail=None,
        image=None,
        error_message=None,
    )

    def stored(image: Image.Image) -> EncodedImage:
        return encode(image, content.image_format, content.jpeg_quality)

    if kind is CorruptionKind.CLEAN:
        image = stored(render_content(address, content))
        if underspecified_share > 0:
            caption_rng = address.rng(Stream.CAPTION)
            if caption_rng.random() < underspecified_share:
                caption = underspecified_caption(content.attributes, caption_rng)
                return replace(sample, caption=caption, corruption_detail="underspecified", image=image)
        return replace(sample, image=image)
    if kind is CorruptionKind.FAILED_DOWNLOAD:
        return replace(sample, error_message=download_error(rng))
    if kind is CorruptionKind.GENERIC_CAPTION:
        caption, flavour = generic_caption(content.attributes, rng)
        language = "en" if flavour == "underspecified" else None
        image = stored(render_content(address, content))
        return replace(sample, caption=caption, language=language, corruption_detail=flavour, image=image)
    if kind is CorruptionKind.NON_ENGLISH:
        language = pick(rng, TRANSLATED_LANGUAGES)
        caption = describe(content.attributes, rng, language)
        return replace(sample, caption=caption, language=language, image=stored(render_content(address, content)))
    if kind is CorruptionKind.TEXT_RENDER:
        return replace(sample, image=stored(render_text(content.caption, content.size, rng)))
    if kind is CorruptionKind.TINY:
        return replace(sample, image=stored(shrink_to_tiny(render_content(address, content), rng)))
    if kind is CorruptionKind.EXTREME_ASPECT:
        return replace(sample, image=stored(render_content(address, content, extreme_aspect_size(rng))))
    if kind is CorruptionKind.UNDECODABLE:
        jpeg = encode(render_content(address, content), "jpg", content.jpeg_quality)
        data, variant = undecodable_bytes(jpeg.data, rng)
        # The metadata still claims the intended size: only decoding reveals the defect.
        broken = EncodedImage(data, "jpg", jpeg.width, jpeg.height)
        return replace(sample, url=address.url("jpg"), image=broken, corruption_detail=variant)

    assert plan is not None
    if kind is CorruptionKind.EVAL_COPY:
        # The eval split's sample, regenerated exactly as the eval split draws it (see pool._plan_splits).
        eval_index = plan.source(address.index)
        eval_source = SampleAddress(address.seed, "eval", eval_index)
        eval_original = draw_content(eval_source, EVAL_DOMAIN_MIX, eval_label(eval_index))
        reupload = near_duplicate_of(render_content(eval_source, eval_original), rng)
        return replace(
            sample,
            url=address.url("jpg"),
            caption=_reworded(eval_original, rng),
            attributes=eval_original.attributes,
            corruption_detail=eval_source.uid,
            image=encode(reupload, "jpg", int(rng.integers(55, 96))),
        )
    source = SampleAddress(address.seed, address.split, plan.source(address.index))
    original = draw_content(source, mix)
    if kind is CorruptionKind.MISALIGNED:
        image = stored(render_content(address, content))
        return replace(sample, caption=original.caption, corruption_detail=source.uid, image=image)
    if kind is CorruptionKind.EXACT_DUPLICATE:
        copy = encode(render_content(source, original), original.image_format, original.jpeg_quality)
        return replace(
            sample,
            url=address.url(original.image_format),
            caption=original.caption,
            attributes=original.attributes,
            duplicate_group=source.uid,
            image=copy,
        )
    if kind is CorruptionKind.NEAR_DUPLICATE:
        reupload = near_duplicate_of(render_content(source, original), rng)
        return replace(
            sample,
            url=address.url("jpg"),
            caption=_reworded(original, rng),
            attributes=original.attributes,
            duplicate_group=source.uid,
            image=encode(reupload, "jpg", int(rng.integers(55, 96))),
        )
    raise AssertionError(f"unhandled corruption kind {kind}")


def _reworded(content: Content, rng: np.random.Generator) -> str:
    """Another caption of the same attributes; a few tries make an identical wording very rare."""
    for _ in range(8):
        caption = describe(content.attributes, rng)
        if caption != content.caption:
            return caption
    return caption

