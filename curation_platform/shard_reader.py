"""Streaming, hostile-input-safe reading of webdataset tars.

The tar is read front to back from a stream (never extracted, never loaded whole): consecutive
members sharing a key form one sample, as in the ``webdataset`` library. Only one sample's bytes
are held at a time. Member names and types are checked before anything is read: absolute paths,
``..`` components, links and devices never become data, and oversize members are skipped unread.
The stream is hashed while it is read, so ingestion can prove it saw the bytes discovery hashed.
"""

from __future__ import annotations

import hashlib
import re
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import BinaryIO

from curation_platform.reasons import Reason
from curation_platform.validation import ValidationLimits

IMAGE_EXTENSIONS = frozenset({"jpg", "jpeg", "png", "webp"})
TEXT_EXTENSIONS = frozenset({"txt", "json"})
_KEY_EXT = re.compile(r"^((?:.*/)?[^./][^/]*?)\.([^/]+)$")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


@dataclass
class TarSample:
    """All members of one key: payloads by slot (image/txt/json) plus the first problem seen."""

    key: str
    payloads: dict[str, bytes] = field(default_factory=dict)
    image_ext: str | None = None
    member_names: list[str] = field(default_factory=list)
    offsets: dict[str, int] = field(default_factory=dict)
    problem: tuple[Reason, str] | None = None
    ignored_members: int = 0

    def flag(self, reason: Reason, detail: str) -> None:
        if self.problem is None:
            self.problem = (reason, detail)


@dataclass(frozen=True)
class UnsafeEntry:
    """A member that cannot be attributed to a sample safely (bad path or no KEY.EXT form)."""

    name: str
    reason: Reason
    detail: str


@dataclass
class TarReadSummary:
    """What the stream said about itself once read (filled in as iteration finishes)."""

    sha256: str | None = None
    bytes_read: int = 0
    error: str | None = None
    directories: int = 0


BLOCK = tarfile.BLOCKSIZE


class _HashingReader:
    """File-like wrapper hashing every byte ``tarfile`` pulls through it.

    Reading on after the stream has reported its end several times raises ``EOFError``: ``tarfile``
    skips an unread member block by block even past the end of the file, so a 10 KiB tar whose header
    claims a terabyte would otherwise keep it busy for minutes (it reads the end twice itself).
    """

    READS_AFTER_END = 8

    def __init__(self, raw: BinaryIO) -> None:
        self._raw = raw
        self._reads_after_end = 0
        self.digest = hashlib.sha256()
        self.bytes_read = 0
        self.tail = b""
        self._peeked = b""

    def peek(self, size: int) -> bytes:
        """The next ``size`` bytes, still to be read."""
        while len(self._peeked) < size:
            data = self._raw.read(size - len(self._peeked))
            if not data:
                break
            self._peeked += data
        return self._peeked[:size]

    def read(self, size: int = -1) -> bytes:
        if self._peeked:
            data, self._peeked = (self._peeked, b"") if size < 0 or size >= len(self._peeked) else (
                self._peeked[:size], self._peeked[size:])
            if size < 0:
                data += self._raw.read()
        else:
            data = self._raw.read(size)
        if not data and size != 0:
            self._reads_after_end += 1
            if self._reads_after_end > self.READS_AFTER_END:
                raise EOFError(f"the tar ends at byte {self.bytes_read:,}, inside a member its header declared")
        self.digest.update(data)
        self.bytes_read += len(data)
        self.tail = (self.tail + data[-BLOCK:])[-BLOCK:]
        return data

    @property
    def ended_cleanly(self) -> bool:
        """Whole 512-byte blocks ending in a zero block: ``tarfile`` takes a cut-off header for the end."""
        return self.bytes_read % BLOCK == 0 and self.tail == bytes(BLOCK)

    def drain(self) -> None:
        while self.read(1 << 20):
            pass


_COMPRESSION_MAGIC = ((b"\x1f\x8b", "gzip"), (b"BZh", "bzip2"), (b"\xfd7zXZ\x00", "xz"), (b"\x28\xb5\x2f\xfd", "zstd"))


MAX_HEADER_BYTES = 64 * 1024  # a GNU long name or a PAX header: img2dataset writes none; webdataset keys are short


class _BoundedTarInfo(tarfile.TarInfo):
    """Refuses GNU long-name/link and PAX extended headers larger than :data:`MAX_HEADER_BYTES`, which
    ``tarfile`` would otherwise read whole into memory (a header can claim gigabytes)."""

    def _proc_gnulong(self, tarfile_):
        if self.size > MAX_HEADER_BYTES:
            raise tarfile.HeaderError(f"GNU long-name header of {self.size:,} bytes (limit {MAX_HEADER_BYTES:,})")
        return super()._proc_gnulong(tarfile_)

    def _proc_pax(self, tarfile_):
        if self.size > MAX_HEADER_BYTES:
            raise tarfile.HeaderError(f"PAX header of {self.size:,} bytes (limit {MAX_HEADER_BYTES:,})")
        return super()._proc_pax(tarfile_)


def compressed_format(head: bytes) -> str | None:
    """The compression whose magic number starts ``head`` (a plain tar starts with a member name)."""
    return next((name for magic, name in _COMPRESSION_MAGIC if head.startswith(magic)), None)


def unsafe_path_reason(name: str) -> str | None:
    """Why a member name must not be trusted as a relative path, or None when it is safe."""
    if not name:
        return "empty member name"
    if _CONTROL.search(name):
        return "control character in member name"
    if name.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", name):
        return "absolute member path"
    if "\\" in name:
        return "backslash in member name"
    if ".." in name.split("/"):
        return "'..' component in member path"
    return None


def split_member_name(name: str) -> tuple[str, str] | None:
    """``dir/000012.jpg`` -> (``dir/000012``, ``jpg``), as webdataset splits keys."""
    normalized = "/".join(part for part in name.split("/") if part not in ("", "."))
    match = _KEY_EXT.match(normalized)
    if match is None:
        return None
    return match.group(1), match.group(2).lower()


def iter_tar_samples(
    stream: BinaryIO,
    summary: TarReadSummary,
    limits: ValidationLimits = ValidationLimits(),
) -> Iterator[TarSample | UnsafeEntry]:
    """Yield samples and unsafe entries in stream order; never raises on a corrupt tar.

    A corrupt or truncated tar ends the iteration with ``summary.error`` set; the sample being
    assembled at that moment is yielded flagged ``truncated_shard``.
    """
    reader = _HashingReader(stream)
    current: TarSample | None = None
    compression = compressed_format(reader.peek(6))
    if compression is not None:
        summary.error = (f"compressed_tar: the shard is a {compression}-compressed tar; img2dataset writes plain "
                         "tars (decompress it, e.g. gunzip, and ingest the .tar)")
        summary.bytes_read = 0
        return
    try:
        with tarfile.open(fileobj=reader, mode="r|", tarinfo=_BoundedTarInfo) as archive:
            for info in archive:
                archive.members = []  # stream mode would otherwise keep every header
                if info.isdir():
                    summary.directories += 1
                    continue
                bad_path = unsafe_path_reason(info.name)
                if bad_path:
                    yield UnsafeEntry(info.name, Reason.UNSAFE_MEMBER_PATH, bad_path)
                    continue
                split = split_member_name(info.name)
                if split is None:
                    yield UnsafeEntry(info.name, Reason.MALFORMED_MEMBER_NAME, "no KEY.EXT form")
                    continue
                key, ext = split
                if current is not None and current.key != key:
                    yield current
                    current = None
                if current is None:
                    current = TarSample(key=key)
                current.member_names.append(info.name)
                _read_member(archive, info, ext, current, limits)
    except (tarfile.TarError, EOFError, OSError, ValueError, UnicodeError) as error:
        summary.error = f"{type(error).__name__}: {error}"
        if current is not None:
            current.flag(Reason.TRUNCATED_SHARD, f"tar broke while reading this sample: {summary.error}")
    if summary.error is None:
        reader.drain()  # tar padding after the end-of-archive marker is part of the file hash
        if reader.ended_cleanly:
            summary.sha256 = reader.digest.hexdigest()
        else:
            summary.error = f"tar unreadable: cut off after {reader.bytes_read} bytes, no end-of-archive block"
            if current is not None:
                current.flag(Reason.TRUNCATED_SHARD, "the tar ends inside or right after this sample")
    if current is not None:
        yield current
    summary.bytes_read = reader.bytes_read


def _read_member(
    archive: tarfile.TarFile, info: tarfile.TarInfo, ext: str, sample: TarSample, limits: ValidationLimits
) -> None:
    if not info.isreg():
        kind = "symlink" if info.issym() else "hard link" if info.islnk() else "device or fifo"
        sample.flag(Reason.UNSAFE_MEMBER_TYPE, f"{info.name!r} is a {kind}")
        return
    if ext in IMAGE_EXTENSIONS:
        slot, limit = "image", limits.max_image_bytes
    elif ext in TEXT_EXTENSIONS:
        slot, limit = ext, limits.max_text_bytes
    else:
        sample.ignored_members += 1
        return
    if info.size > limit:
        sample.flag(Reason.OVERSIZE_MEMBER, f"{info.name!r} has {info.size} bytes > limit {limit}")
        return
    if slot in sample.payloads:
        sample.flag(Reason.DUPLICATE_MEMBER, f"second {slot} member {info.name!r}")
        return
    handle = archive.extractfile(info)
    data = handle.read() if handle is not None else b""
    if len(data) != info.size:
        raise EOFError(f"member {info.name!r} truncated: {len(data)} of {info.size} bytes")
    sample.payloads[slot] = data
    sample.offsets[slot] = info.offset_data
    if slot == "image":
        sample.image_ext = ext
