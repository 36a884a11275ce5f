"""Writer for the img2dataset webdataset shard format, as DataComp pools use it.

A shard ``NNNNN`` is three files: ``NNNNN.tar`` (members ``KEY.jpg|png``, ``KEY.json``,
``KEY.txt`` for each downloaded sample), ``NNNNN.parquet`` (one row per *attempted* sample, failed
downloads included) and ``NNNNN_stats.json``. Each file is written under a temporary name and moved
into place only when complete, stats last, so a killed writer never leaves a shard that looks whole.
Tar members carry fixed metadata, so the same samples always give byte-identical shards.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Literal

import pyarrow as pa
import pyarrow.parquet as pq

from curation_platform.file_modes import apply_default_modes

ImageFormat = Literal["jpg", "png"]

SHARD_DIGITS = 5
MIN_SAMPLE_DIGITS = 4
SUCCESS = "success"
FAILED_TO_DOWNLOAD = "failed_to_download"
# 2020-09-13T12:26:40Z: tar members get one fixed mtime so identical content gives identical bytes.
TAR_MEMBER_MTIME = 1_600_000_000
TAR_MEMBER_MODE = 0o644

PARQUET_SCHEMA = pa.schema(
    [
        ("key", pa.string()),
        ("uid", pa.string()),
        ("url", pa.string()),
        ("caption", pa.string()),
        ("status", pa.string()),
        ("error_message", pa.string()),
        ("width", pa.int64()),
        ("height", pa.int64()),
        ("original_width", pa.int64()),
        ("original_height", pa.int64()),
        ("exif", pa.string()),
        ("sha256", pa.string()),
    ]
)


def shard_name(shard_index: int) -> str:
    """``7`` -> ``"00007"``: the stem shared by a shard's tar, parquet and stats files."""
    return f"{shard_index:0{SHARD_DIGITS}d}"


def sample_key_digits(samples_per_shard: int) -> int:
    """Digits of the within-shard part of a key: enough for the largest index, at least four."""
    return max(MIN_SAMPLE_DIGITS, len(str(max(samples_per_shard - 1, 0))))


def sample_key(shard_index: int, index_in_shard: int, key_digits: int) -> str:
    """img2dataset's key: shard number then index within the shard, both zero-padded."""
    return f"{shard_name(shard_index)}{index_in_shard:0{key_digits}d}"


@contextmanager
def atomic_output(path: Path) -> Iterator[Path]:
    """Yield a temporary sibling of ``path``; move it onto ``path`` only if the block succeeds.

    The temporary name starts with a dot and ends in ``.tmp``, so shard globs never match it.
    """
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(handle)
    try:
        yield Path(temporary)
        apply_default_modes(Path(temporary))  # mkstemp made it 0600
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


@dataclass(frozen=True)
class ShardStats:
    """What a finished shard holds, mirrored in its ``_stats.json``."""

    tar: Path
    parquet: Path
    stats: Path
    count: int
    successes: int
    failed_to_download: int
    bytes_downloaded: int


class Img2DatasetShardWriter:
    """Stream samples into one shard; image bytes go straight to the tar, only rows stay in memory.

    Use as a context manager: leaving the block normally finalizes the shard, leaving it with an
    exception discards everything written so far.
    """

    def __init__(
        self,
        out_dir: Path,
        shard_index: int,
        key_digits: int,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.out_dir = Path(out_dir)
        self.shard_index = shard_index
        self.key_digits = key_digits
        self._clock = clock
        self._rows: dict[str, list[Any]] = {name: [] for name in PARQUET_SCHEMA.names}
        self._status_counts: Counter[str] = Counter()
        self._bytes_downloaded = 0
        self._start_time = 0.0
        self._tar_stack = ExitStack()
        self._tar: tarfile.TarFile | None = None

    @property
    def _stem(self) -> Path:
        return self.out_dir / shard_name(self.shard_index)

    def __enter__(self) -> Img2DatasetShardWriter:
        self._start_time = self._clock()
        with ExitStack() as stack:
            temporary = stack.enter_context(atomic_output(self._stem.with_suffix(".tar")))
            tar_file = stack.enter_context(open(temporary, "wb"))
            self._tar = stack.enter_context(
                tarfile.open(fileobj=tar_file, mode="w", format=tarfile.PAX_FORMAT)
            )
            self._tar_stack = stack.pop_all()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if exc is None:
            self.close()
        else:
            self._tar = None
            self._tar_stack.__exit__(exc_type, exc, traceback)

    def add_success(
        self,
        *,
        uid: str,
        url: str,
        caption: str,
        image: bytes,
        image_format: ImageFormat,
        width: int,
        height: int,
        original_width: int | None = None,
        original_height: int | None = None,
        exif: str | None = None,
    ) -> str:
        """Append a downloaded sample (image, caption, metadata members); returns its key."""
        key = self._next_key()
        row = {
            "key": key,
            "url": url,
            "caption": caption,
            "status": SUCCESS,
            "error_message": None,
            "width": width,
            "height": height,
            "original_width": width if original_width is None else original_width,
            "original_height": height if original_height is None else original_height,
            "exif": exif,
            "sha256": hashlib.sha256(image).hexdigest(),
            "uid": uid,
        }
        members = {
            image_format: image,
            "json": json.dumps(row, ensure_ascii=False).encode("utf-8"),
            "txt": caption.encode("utf-8"),
        }
        # Sorted by extension, as webdataset's own TarWriter orders a sample's members.
        for extension in sorted(members):
            self._add_member(f"{key}.{extension}", members[extension])
        self._append_row(row)
        self._status_counts[SUCCESS] += 1
        self._bytes_downloaded += len(image)
        return key

    def add_failure(self, *, uid: str, url: str, caption: str, error_message: str) -> str:
        """Record a sample whose download failed: a parquet row only, no tar members."""
        key = self._next_key()
        row = {
            "key": key,
            "uid": uid,
            "url": url,
            "caption": caption,
            "status": FAILED_TO_DOWNLOAD,
            "error_message": error_message,
        }
        self._append_row(row)
        self._status_counts[error_message] += 1
        return key

    def close(self) -> ShardStats:
        """Finish the tar, then write parquet and stats (stats last: its presence means done)."""
        if self._tar is None:
            raise RuntimeError("shard writer is not open")
        self._tar = None
        self._tar_stack.close()
        parquet = self._stem.with_suffix(".parquet")
        with atomic_output(parquet) as temporary:
            pq.write_table(pa.table(self._rows, schema=PARQUET_SCHEMA), temporary)
        result = ShardStats(
            tar=self._stem.with_suffix(".tar"),
            parquet=parquet,
            stats=self.out_dir / f"{shard_name(self.shard_index)}_stats.json",
            count=len(self._rows["key"]),
            successes=self._status_counts[SUCCESS],
            failed_to_download=len(self._rows["key"]) - self._status_counts[SUCCESS],
            bytes_downloaded=self._bytes_downloaded,
        )
        end_time = self._clock()
        stats = {
            "count": result.count,
            "successes": result.successes,
            "failed_to_download": result.failed_to_download,
            "failed_to_resize": 0,
            "duration": round(end_time - self._start_time, 6),
            "bytes_downloaded": result.bytes_downloaded,
            "start_time": self._start_time,
            "end_time": end_time,
            "status_dict": dict(self._status_counts),
        }
        with atomic_output(result.stats) as temporary:
            temporary.write_text(json.dumps(stats, indent=4) + "\n", encoding="utf-8")
        return result

    def _next_key(self) -> str:
        if self._tar is None:
            raise RuntimeError("Img2DatasetShardWriter must be entered before samples are added")
        return sample_key(self.shard_index, len(self._rows["key"]), self.key_digits)

    def _append_row(self, row: dict[str, Any]) -> None:
        for name, column in self._rows.items():
            column.append(row.get(name))

    def _add_member(self, name: str, data: bytes) -> None:
        info = tarfile.TarInfo(name)
        info.size = len(data)
        info.mtime = TAR_MEMBER_MTIME
        info.mode = TAR_MEMBER_MODE
        info.uid = info.gid = 0
        info.uname = info.gname = ""
        assert self._tar is not None
        self._tar.addfile(info, io.BytesIO(data))
