"""Parallel decode + preprocess of a shard's accepted samples, for the embedding engine.

Ingestion recorded each accepted image's byte offset and size inside the tar. The loader cuts the
accepted samples (in tar order) into chunks of consecutive samples; a DataLoader worker turns one
chunk into a single ranged read (one request on S3, one ``pread`` locally), decodes and resizes
its images into a uint8 tensor and tokenizes its captions. Normalisation happens on the device.
Memory is bounded by ``chunk_size x (workers x prefetch + 1)`` images, whatever the shard size.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import torch
from PIL import Image, ImageOps

from curation_platform import storage
from curation_platform.storage import S3Settings
from curation_platform.teachers import Preprocessing

_RESAMPLE = {"bicubic": Image.BICUBIC, "bilinear": Image.BILINEAR, "nearest": Image.NEAREST}


@dataclass(frozen=True)
class ImagePreprocessor:
    """Bytes -> uint8 (3, S, S) the way open_clip's transform does it (resize, centre crop).

    With ``preprocessing.jpeg_draft`` libjpeg decodes at a reduced DCT scale still >= the target
    size before the exact resize: much faster for large JPEGs, at a small pixel difference, which
    is why the flag is part of the teacher's identity.
    """

    preprocessing: Preprocessing

    def __call__(self, data: bytes) -> np.ndarray:
        size = self.preprocessing.size
        with Image.open(io.BytesIO(data)) as image:
            if self.preprocessing.jpeg_draft and image.format == "JPEG":
                image.draft("RGB", (size, size))
            image = ImageOps.exif_transpose(image).convert("RGB")
        resample = _RESAMPLE[self.preprocessing.interpolation]
        width, height = image.size
        if self.preprocessing.resize_mode == "squash":
            image = image.resize((size, size), resample)
        else:
            short, long = sorted((width, height))
            scaled_long = int(size * long / short)
            new_size = (size, scaled_long) if width <= height else (scaled_long, size)
            image = image.resize(new_size, resample)
            left = int(round((new_size[0] - size) / 2.0))
            top = int(round((new_size[1] - size) / 2.0))
            image = image.crop((left, top, left + size, top + size))
        return np.asarray(image, dtype=np.uint8).transpose(2, 0, 1)


class PixelNormaliser:
    """uint8 pixels (N, 3, S, S) -> the model's float input, ``(x - 255 mean) * (1 / (255 std))``: the one
    arithmetic of the engine, teacher training and target folders, so their inputs agree bit for bit."""

    def __init__(self, preprocessing: Preprocessing, device: str | torch.device = "cpu") -> None:
        self.mean = torch.tensor(preprocessing.mean, device=device).view(1, 3, 1, 1) * 255
        self.inv_std = 1 / (torch.tensor(preprocessing.std, device=device).view(1, 3, 1, 1) * 255)

    def __call__(self, pixels: torch.Tensor) -> torch.Tensor:
        return (pixels.float() - self.mean) * self.inv_std


@dataclass(frozen=True)
class Chunk:
    """Consecutive accepted samples of one tar: one ranged read covers them all."""

    job: int
    tar_uri: str
    uids: list[str]
    captions: list[str]
    offsets: list[int]
    sizes: list[int]

    @property
    def span(self) -> tuple[int, int]:
        return self.offsets[0], self.offsets[-1] + self.sizes[-1]


def plan_chunks(job: int, tar_uri: str, samples: pa.Table, chunk_size: int) -> list[Chunk]:
    """Accepted-sample rows (uid, caption, image_offset, image_bytes) -> chunks in tar order."""
    ordered = samples.select(["uid", "caption", "image_offset", "image_bytes"]).sort_by("image_offset")
    columns = {name: ordered.column(name).to_pylist() for name in ordered.column_names}
    return [
        Chunk(
            job=job,
            tar_uri=tar_uri,
            uids=columns["uid"][start : start + chunk_size],
            captions=columns["caption"][start : start + chunk_size],
            offsets=columns["image_offset"][start : start + chunk_size],
            sizes=columns["image_bytes"][start : start + chunk_size],
        )
        for start in range(0, ordered.num_rows, chunk_size)
    ]


class ChunkDataset(torch.utils.data.Dataset):
    """Map-style dataset over chunks of one or more shards; a worker keeps its current tar open."""

    def __init__(self, chunks: list[Chunk], preprocessor: ImagePreprocessor, tokenizer: Any,
                 s3: S3Settings | None = None) -> None:
        self.chunks = chunks
        self.preprocessor = preprocessor
        self.tokenizer = tokenizer
        self.s3 = s3
        self._open: tuple[str, Any] | None = None

    def __len__(self) -> int:
        return len(self.chunks)

    def _read(self, tar_uri: str, start: int, end: int) -> bytes:
        if self._open is None or self._open[0] != tar_uri:
            filesystem, path = storage.filesystem_for(tar_uri, self.s3)
            self._open = (tar_uri, filesystem.open_input_file(path))
        return self._open[1].read_at(end - start, start)

    def __getitem__(self, index: int) -> dict[str, Any]:
        chunk = self.chunks[index]
        start, end = chunk.span
        block = self._read(chunk.tar_uri, start, end)
        pixels = np.empty((len(chunk.uids), 3, self.preprocessor.preprocessing.size,
                           self.preprocessor.preprocessing.size), dtype=np.uint8)
        for row, (offset, size) in enumerate(zip(chunk.offsets, chunk.sizes, strict=True)):
            data = block[offset - start : offset - start + size]
            try:
                pixels[row] = self.preprocessor(data)
            except Exception as error:  # validated bytes no longer decode: the tar was replaced
                raise RuntimeError(
                    f"{chunk.tar_uri}: sample {chunk.uids[row]} at byte {offset} no longer decodes ({error}); "
                    "the shard changed since validation, re-ingest it"
                ) from error
        return {"job": chunk.job, "uids": chunk.uids, "pixels": torch.from_numpy(pixels), "tokens": self.tokenizer(chunk.captions)}

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_open"] = None  # file handles do not cross process boundaries
        return state
