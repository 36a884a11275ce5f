"""Per-sample content checks: image decode, caption text, language.

:func:`check_content` is a pure function of one sample's bytes, so ingestion can fan it out to
worker processes (image decoding is the CPU cost of ingestion). Decompression bombs are caught
from the image header before any pixel is decoded; EXIF orientation is applied before sizes are
measured, because that is the image a model will see.
"""

from __future__ import annotations

import hashlib
import io
import unicodedata
import warnings
from dataclasses import dataclass
from functools import lru_cache

from PIL import Image, ImageOps, UnidentifiedImageError

from curation_platform.reasons import Reason

ALLOWED_IMAGE_FORMATS = frozenset({"JPEG", "PNG", "WEBP"})


@dataclass(frozen=True)
class ValidationLimits:
    """Thresholds of the quarantine checks (selection filters such as min side 200 come later)."""

    max_pixels: int = 40_000_000
    # A safety bound on the loader's memory, not DataComp's aspect filter: a 400,000 x 32 PNG is 12.8M
    # pixels, within max_pixels, but resizing its short side to 224 would allocate 2.9 GB.
    max_image_side: int = 16_384
    min_image_side: int = 32
    max_caption_chars: int = 2_048
    max_image_bytes: int = 32 << 20
    max_text_bytes: int = 1 << 20


@dataclass(frozen=True)
class ContentOk:
    width: int
    height: int
    image_format: str
    image_sha256: str
    image_bytes: int
    exif_transposed: bool
    caption: str
    caption_chars: int
    caption_words: int
    language: str
    language_score: float


@dataclass(frozen=True)
class ContentRejected:
    reason: Reason
    detail: str


def check_content(image: bytes | None, caption: bytes | None, limits: ValidationLimits) -> ContentOk | ContentRejected:
    """Validate one sample's image and caption bytes; never raises on bad input."""
    if image is None:
        return ContentRejected(Reason.MISSING_IMAGE, "no image member")
    caption_result = _check_caption(caption, limits)
    if isinstance(caption_result, ContentRejected):
        return caption_result
    image_result = _check_image(image, limits)
    if isinstance(image_result, ContentRejected):
        return image_result
    width, height, image_format, transposed = image_result
    language, language_score = detect_language(caption_result)
    return ContentOk(
        width=width,
        height=height,
        image_format=image_format,
        image_sha256=hashlib.sha256(image).hexdigest(),
        image_bytes=len(image),
        exif_transposed=transposed,
        caption=caption_result,
        caption_chars=len(caption_result),
        caption_words=len(caption_result.split()),
        language=language,
        language_score=language_score,
    )


def _check_caption(raw: bytes | None, limits: ValidationLimits) -> str | ContentRejected:
    if raw is None:
        return ContentRejected(Reason.MISSING_CAPTION, "no .txt member")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as error:
        return ContentRejected(Reason.INVALID_UTF8, f"byte {error.start}: {error.reason}")
    text = unicodedata.normalize("NFC", text).strip()
    if not text:
        return ContentRejected(Reason.MISSING_CAPTION, "caption is empty")
    if len(text) > limits.max_caption_chars:
        return ContentRejected(Reason.CAPTION_TOO_LONG, f"{len(text)} characters > {limits.max_caption_chars}")
    return text


def _check_image(data: bytes, limits: ValidationLimits) -> tuple[int, int, str, bool] | ContentRejected:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as image:
                width, height = image.size
                if width * height > limits.max_pixels:
                    return ContentRejected(
                        Reason.DECOMPRESSION_BOMB, f"{width}x{height} = {width * height} px > {limits.max_pixels}"
                    )
                if max(width, height) > limits.max_image_side:
                    return ContentRejected(
                        Reason.IMAGE_TOO_LARGE, f"{width}x{height}: a side above {limits.max_image_side} px"
                    )
                image_format = image.format or "unknown"
                if image_format not in ALLOWED_IMAGE_FORMATS:
                    return ContentRejected(Reason.UNSUPPORTED_IMAGE_FORMAT, f"format {image_format}")
                image.load()
                oriented = _exif_transpose(image)
                transposed = oriented is not image
                width, height = oriented.size
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        return ContentRejected(Reason.DECOMPRESSION_BOMB, str(error))
    except UnidentifiedImageError:
        return ContentRejected(Reason.UNDECODABLE_IMAGE, f"not a known image format; starts with {data[:12]!r}")
    except Exception as error:  # PIL raises many types on corrupt data; all mean "undecodable"
        return ContentRejected(Reason.UNDECODABLE_IMAGE, f"{type(error).__name__}: {error}")
    if min(width, height) < limits.min_image_side:
        return ContentRejected(Reason.IMAGE_TOO_SMALL, f"{width}x{height} < {limits.min_image_side} px")
    return width, height, image_format, transposed


def _exif_transpose(image: Image.Image) -> Image.Image:
    """Apply the EXIF orientation; malformed EXIF leaves the image as stored."""
    try:
        return ImageOps.exif_transpose(image) or image
    except Exception:  # a broken EXIF block is metadata noise, not an undecodable image
        return image


@lru_cache(maxsize=1)
def _language_identifier():
    # py3langid ships its model inside the wheel: no download, deterministic, ~40 us a caption.
    from py3langid.langid import MODEL_FILE, LanguageIdentifier

    return LanguageIdentifier.from_model_file(MODEL_FILE, norm_probs=True)


def detect_language(text: str) -> tuple[str, float]:
    """ISO 639-1 code and its probability for a caption."""
    language, probability = _language_identifier().classify(text)
    return str(language), float(probability)
