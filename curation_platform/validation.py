"""Per-sample content checks: image decode, caption text, language.

:func:`check_content` is a pure function of one sample's bytes, so ingestion can fan it out to
worker processes (image decoding is the CPU cost of ingestion). Decompression bombs are caught
from the image header before any pixel is decoded; EXIF orientation is applied before sizes are
measured, because that is the image a model will see.

Language: :func:`detect_language` follows DataComp's rule (fasttext lid.176, top label) when the user
points ``CURATION_FASTTEXT_LID`` at that model, and otherwise py3langid with an English rule for
captions it cannot place (docs/baselines.md has the measurements behind its two constants).
"""

from __future__ import annotations

import hashlib
import io
import os
import tempfile
import unicodedata
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Protocol

from PIL import Image, ImageOps, UnidentifiedImageError

from curation_platform import storage
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
    decoded, caption_result = caption_result
    image_result = _check_image(image, limits)
    if isinstance(image_result, ContentRejected):
        return image_result
    width, height, image_format, transposed = image_result
    language, language_score = detect_language(decoded)
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


def _check_caption(raw: bytes | None, limits: ValidationLimits) -> tuple[str, str] | ContentRejected:
    """The caption as decoded (what DataComp's language model reads) and as stored (NFC, stripped)."""
    if raw is None:
        return ContentRejected(Reason.MISSING_CAPTION, "no .txt member")
    try:
        decoded = raw.decode("utf-8")
    except UnicodeDecodeError as error:
        return ContentRejected(Reason.INVALID_UTF8, f"byte {error.start}: {error.reason}")
    text = _clean_caption(decoded)
    if not text:
        return ContentRejected(Reason.MISSING_CAPTION, "caption is empty")
    if len(text) > limits.max_caption_chars:
        return ContentRejected(Reason.CAPTION_TOO_LONG, f"{len(text)} characters > {limits.max_caption_chars}")
    return decoded, text


def _clean_caption(decoded: str) -> str:
    return unicodedata.normalize("NFC", decoded).strip()


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


# -- language ------------------------------------------------------------------------------------

FASTTEXT_LID_ENV = "CURATION_FASTTEXT_LID"  # path or s3:// URI of DataComp's lid.176.bin (or .ftz)
# py3langid's English rule for captions it cannot place: when no language reaches ENGLISH_FLOOR and
# English has at least ENGLISH_RATIO of the top language's probability, the caption is English.
# Measured on 200 short captions (docs/baselines.md): top-1 alone keeps 63 of 100 English ones.
ENGLISH_FLOOR = 0.5
ENGLISH_RATIO = 0.2


class LanguageModelUnavailable(RuntimeError):
    """``CURATION_FASTTEXT_LID`` is set but the model cannot be loaded: ingestion stops rather than
    silently labelling the pool with a different model."""


class FastTextModel(Protocol):
    """The part of ``fasttext.FastText._FastText`` DataComp uses (a test can pass a fake)."""

    def predict(self, text: str, k: int = 1) -> tuple[Sequence[str], Any]: ...


def detect_language(text: str) -> tuple[str, float]:
    """ISO 639 code and its probability for a caption as decoded from its ``.txt`` member.

    With ``CURATION_FASTTEXT_LID`` set: DataComp's rule, fasttext lid.176's top label
    (:func:`fasttext_language`). Otherwise py3langid on the NFC-normalised, stripped caption, with
    :func:`langid_language`'s English rule.
    """
    model_uri = os.environ.get(FASTTEXT_LID_ENV)
    if model_uri:
        return fasttext_language(text, fasttext_model(model_uri))
    return langid_language(_clean_caption(text))


def language_model() -> str:
    """Which model :func:`detect_language` uses now, for provenance records."""
    model_uri = os.environ.get(FASTTEXT_LID_ENV)
    if model_uri:
        return f"fasttext:{model_uri}"
    from importlib.metadata import version

    return f"py3langid-{version('py3langid')} (en below p {ENGLISH_FLOOR} within {ENGLISH_RATIO}x of the top)"


def fasttext_language(text: str, model: FastTextModel) -> tuple[str, float]:
    """DataComp's ``get_fasttext_language``: the top label of the text with newlines as spaces
    (fasttext refuses newlines), without any confidence floor. fasttext returns exp(log(p + 1e-5)),
    which can exceed 1; the stored score is kept within [0, 1]."""
    labels, probabilities = model.predict(text.replace("\n", " "), k=1)
    return str(labels[0]).removeprefix("__label__"), min(float(probabilities[0]), 1.0)


@lru_cache(maxsize=2)
def fasttext_model(model_uri: str) -> FastTextModel:
    """The fasttext model at ``model_uri``, loaded once per process; an S3 object is copied to a local
    cache first because fasttext reads only local files. The platform never downloads it itself."""
    try:
        import fasttext
    except ImportError as error:
        raise LanguageModelUnavailable(
            f"{FASTTEXT_LID_ENV}={model_uri} asks for DataComp's fasttext language model, but the fasttext "
            "package is not installed: `pip install fasttext-numpy2-wheel` (fasttext-wheel 0.9.2 fails under "
            f"numpy 2), or unset {FASTTEXT_LID_ENV} to use py3langid"
        ) from error
    if hasattr(fasttext, "FastText"):
        fasttext.FastText.eprint = lambda *_: None  # load_model's deprecation notice, once per worker
    return fasttext.load_model(_local_model_path(model_uri))


def _local_model_path(model_uri: str) -> str:
    if storage.is_local(model_uri):
        if not Path(storage.absolute(model_uri)).is_file():
            raise LanguageModelUnavailable(f"{FASTTEXT_LID_ENV}={model_uri}: no such file")
        return storage.absolute(model_uri)
    digest = hashlib.sha256(model_uri.encode()).hexdigest()[:16]
    cached = Path(tempfile.gettempdir()) / "curation-fasttext" / f"{digest}-{Path(model_uri).name}"
    if not cached.is_file():
        if not storage.exists(model_uri):
            raise LanguageModelUnavailable(f"{FASTTEXT_LID_ENV}={model_uri}: no such object")
        cached.parent.mkdir(parents=True, exist_ok=True)
        partial = cached.with_suffix(f".{os.getpid()}.partial")  # workers may fetch it concurrently
        partial.write_bytes(storage.read_bytes(model_uri))
        os.replace(partial, cached)
    return str(cached)


@lru_cache(maxsize=1)
def _language_identifier():
    # py3langid ships its model inside the wheel: no download, deterministic, ~170 us a caption.
    from py3langid.langid import MODEL_FILE, LanguageIdentifier

    return LanguageIdentifier.from_model_file(MODEL_FILE, norm_probs=True)


def langid_language(text: str) -> tuple[str, float]:
    """py3langid's top language and probability, except that a caption it cannot place is English when
    English is close to the top (:func:`unsure_english`): short English alt-text such as "picture" is
    otherwise labelled Latin at p = 0.05, and DataComp's fasttext calls it English."""
    ranked = _language_identifier().rank(text)
    top, top_probability = ranked[0]
    english = dict(ranked).get("en", 0.0)
    if top != "en" and unsure_english(float(top_probability), float(english)):
        return "en", float(english)
    return str(top), float(top_probability)


def unsure_english(top_probability: float, english_probability: float) -> bool:
    """No language is likely (top below :data:`ENGLISH_FLOOR`) and English has at least
    :data:`ENGLISH_RATIO` of the top language's probability."""
    return top_probability < ENGLISH_FLOOR and english_probability >= ENGLISH_RATIO * top_probability
