"""The files of a release folder and how it becomes visible: the file names, DataComp's ``subset.npy``
encoding of uids (:func:`subset_array`, :func:`subset_uids`), parquet and npy bytes, ``SHA256SUMS``
over a staged folder, publishing a staged folder as ``<name>/<version>`` in one step (locally one
``rename``; on S3 the version is first claimed by a conditional PUT, then ``SHA256SUMS`` is written
last, and versions without it are not releases), the
published versions of a name, and the git commit a release was made from.
"""

from __future__ import annotations

import hashlib
import io
import os
import re
import shutil
import subprocess
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from pyarrow import fs as pafs

from curation_platform import storage
from curation_platform.file_modes import apply_default_modes
from curation_platform.storage import S3Settings

MANIFEST = "manifest.json"
SAMPLES = "samples.parquet"
SUBSET = "subset.npy"
CHECKSUMS = "SHA256SUMS"
EXCLUDED = "excluded_uids.txt"
CLAIMS = ".claims"  # releases/<name>/.claims/<version>: who took a version number on S3


# -- subset.npy ---------------------------------------------------------------------------------

_NIBBLE = np.full(256, 255, np.uint8)
_NIBBLE[np.frombuffer(b"0123456789abcdef", np.uint8)] = np.arange(16)
_NIBBLE[np.frombuffer(b"ABCDEF", np.uint8)] = np.arange(10, 16)


def subset_array(uids: list[str]) -> np.ndarray:
    """DataComp's subset: sorted ``(int(uid[:16], 16), int(uid[16:32], 16))`` pairs, dtype ``u8,u8``.

    Decoded in numpy (a lookup table over the uids' ASCII bytes), not per uid in Python.
    """
    chars = np.frombuffer(np.asarray(uids, dtype="S33").tobytes(), np.uint8).reshape(len(uids), 33)
    nibbles = _NIBBLE[chars[:, :32]]
    if (nibbles == 255).any() or chars[:, 32].any():
        raise ValueError("DataComp subsets need uids of exactly 32 hexadecimal digits")
    halves = np.ascontiguousarray((nibbles[:, 0::2] << 4) | nibbles[:, 1::2]).view(">u8")
    pairs = np.empty(len(uids), dtype=np.dtype("u8,u8"))
    pairs["f0"], pairs["f1"] = halves[:, 0], halves[:, 1]
    pairs.sort(order=["f0", "f1"])
    return pairs


def subset_uids(subset: np.ndarray) -> list[str]:
    """The inverse of :func:`subset_array`."""
    return [f"{int(high):016x}{int(low):016x}" for high, low in subset.tolist()]


# -- file contents ------------------------------------------------------------------------------

def npy_bytes(array: np.ndarray) -> bytes:
    sink = io.BytesIO()
    np.save(sink, array, allow_pickle=False)
    return sink.getvalue()


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: Path) -> str:
    """A local file's sha256, read in 1 MiB chunks (release files can be gigabytes)."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def write_checksums(staging: Path) -> None:
    lines = [f"{sha256_file(path)}  {path.relative_to(staging).as_posix()}"
             for path in sorted(staging.rglob("*")) if path.is_file() and path.name != CHECKSUMS]
    (staging / CHECKSUMS).write_text("\n".join(lines) + "\n")


@dataclass(frozen=True)
class FolderCheck:
    """A published folder against its SHA256SUMS."""

    checked: int
    mismatched: list[str]
    missing: list[str]
    unlisted: list[str]  # files present but not in SHA256SUMS
    malformed: list[str] = field(default_factory=list)  # SHA256SUMS lines that are not "<sha256>  <relative path>"

    @property
    def ok(self) -> bool:
        return not (self.mismatched or self.missing or self.unlisted or self.malformed)


_DIGEST = re.compile(r"^[0-9a-f]{64}$")
MAX_CHECKSUM_LINES = 100_000


def _safe_name(name: str) -> bool:
    """A relative POSIX path inside the folder: no absolute path, drive, backslash, empty or dot parts."""
    parts = name.split("/")
    return (bool(name) and not name.startswith("/") and "\\" not in name and ":" not in parts[0]
            and all(part not in ("", ".", "..") for part in parts) and name.isprintable())


def _stream_sha256(filesystem: pafs.FileSystem, path: str) -> str:
    digest = hashlib.sha256()
    with filesystem.open_input_stream(path) as stream:
        while chunk := stream.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def check_checksums(folder_uri: str, s3: S3Settings | None = None) -> FolderCheck:
    """Every file of a published folder (a release, an evaluation record) against its SHA256SUMS.

    Only files found by listing the folder are opened (a line naming ``../x`` or ``/dev/zero`` is
    reported as malformed, never followed), each hashed in 1 MiB chunks; a missing SHA256SUMS is
    reported as missing rather than raised.
    """
    filesystem, root = storage.filesystem_for(folder_uri, s3)
    infos = filesystem.get_file_info(pafs.FileSelector(root, recursive=True, allow_not_found=True))
    present = {info.path[len(root.rstrip("/")) + 1:]: info.path for info in infos if info.type == pafs.FileType.File}
    if CHECKSUMS not in present:
        return FolderCheck(0, [], [CHECKSUMS], sorted(present))
    listed: dict[str, str] = {}
    malformed: list[str] = []
    raw = storage.read_bytes(storage.join(folder_uri, CHECKSUMS), s3)
    for number, line in enumerate(raw.decode("utf-8", "replace").splitlines()[:MAX_CHECKSUM_LINES], start=1):
        digest, separator, name = line.partition("  ")
        if not line:
            continue
        if not separator or not _DIGEST.match(digest) or not _safe_name(name) or name in listed:
            malformed.append(f"line {number}: {line[:120]!r}")
            continue
        listed[name] = digest
    mismatched = [name for name, digest in sorted(listed.items())
                  if name in present and _stream_sha256(filesystem, present[name]) != digest]
    missing = sorted(name for name in listed if name not in present)
    return FolderCheck(len(listed), mismatched, missing, sorted(set(present) - set(listed) - {CHECKSUMS}), malformed)


def _git_commit() -> str | None:
    try:
        result = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True,
                                text=True, timeout=10, check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    return result.stdout.strip() or None


# -- the release folder -------------------------------------------------------------------------

def versions_of(releases_uri: str, name: str, s3: S3Settings | None = None) -> list[int]:
    """Published versions of a release name (folders with SHA256SUMS), ascending."""
    base = storage.join(releases_uri, name)
    found = []
    for entry in storage.list_dirs(base, s3):
        if entry.isdigit() and storage.exists(storage.join(base, entry, CHECKSUMS), s3):
            found.append(int(entry))
    return sorted(found)


def _claim(releases_uri: str, name: str, version: int, s3: S3Settings | None) -> None:
    """Take ``version`` with a PUT that succeeds only if nobody has (``If-None-Match: *``, which AWS S3
    and SeaweedFS enforce): of concurrent creators exactly one writes the folder, the others get
    ``FileExistsError`` and move to the next version. Without it two writers could mix their files."""
    from botocore.exceptions import ClientError

    bucket, _, prefix = storage.join(releases_uri, name, CLAIMS, str(version))[len("s3://"):].partition("/")
    try:
        (s3 or S3Settings.from_env()).boto3_client().put_object(Bucket=bucket, Key=prefix, Body=b"",
                                                                IfNoneMatch="*")
    except ClientError as error:
        if error.response.get("Error", {}).get("Code") in ("PreconditionFailed", "ConditionalRequestConflict", "412"):
            raise FileExistsError(f"release {name}/{version} was claimed by another writer") from error
        raise


def next_version(releases_uri: str, name: str, s3: S3Settings | None) -> int:
    taken = [int(entry) for entry in storage.list_dirs(storage.join(releases_uri, name), s3) if entry.isdigit()]
    return max(taken, default=0) + 1


def publish_folder(staging: Path, releases_uri: str, name: str, version: int, s3: S3Settings | None) -> str:
    """Make the staged folder visible in one step (local rename; on an object store SHA256SUMS written last).

    On S3 the version is claimed first (:func:`_claim`); other fsspec stores have no such claim, so there
    concurrent publishers of one name are not kept apart."""
    final = storage.join(storage.absolute(releases_uri), name, str(version))
    if storage.exists(storage.join(final, CHECKSUMS), s3):
        raise FileExistsError(f"release {name}/{version} exists and is never overwritten")
    if storage.is_local(releases_uri):
        parent = Path(final).parent
        parent.mkdir(parents=True, exist_ok=True)
        hidden = parent / f".staging-{version}-{uuid.uuid4().hex}"
        shutil.copytree(staging, hidden)
        apply_default_modes(hidden)  # the staging folder was a 0700 TemporaryDirectory
        try:
            os.rename(hidden, final)  # fails on an existing non-empty folder: never overwrites
        except OSError as error:
            shutil.rmtree(hidden, ignore_errors=True)
            raise FileExistsError(f"release {name}/{version} appeared meanwhile") from error
        return str(Path(final).resolve())
    if storage.is_s3(releases_uri):
        _claim(releases_uri, name, version, s3)
    files = sorted(path for path in staging.rglob("*") if path.is_file())
    for path in sorted(files, key=lambda path: path.name == CHECKSUMS):
        storage.write_bytes_atomic(storage.join(final, *path.relative_to(staging).parts), path.read_bytes(), s3)
    return final
