"""One way to address files on local disk, on S3-compatible object stores and on any fsspec filesystem.

Every location in the platform is a URI string: a local path (``/data/pool``, ``pool``, ``file:///data/pool``),
``s3://bucket/prefix``, or any other fsspec URL (``gs://``, ``az://`` / ``abfs://``, ``hf://datasets/...``,
``memory://``), the locations img2dataset, webdataset and DataComp accept. :func:`filesystem_for` resolves it
to a ``pyarrow.fs`` filesystem and a path inside it, so readers stream from all of them with the same code:
S3 through pyarrow's native client, every other scheme through its fsspec implementation behind pyarrow's
``FSSpecHandler``. S3 settings come only from :class:`S3Settings` (the standard ``AWS_*`` variables, and what
they leave unset is left to the AWS SDKs' own chain: ``~/.aws/config`` profiles, the instance role); other
schemes read their implementation's usual credentials and fsspec's config. Nothing is hard-coded.
"""

from __future__ import annotations

import os
import posixpath
import re
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from urllib.parse import urlparse

import fsspec
import fsspec.core
import pyarrow.fs as pafs

S3_SCHEME = "s3://"
FILE_SCHEME = "file://"
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_RANGE = re.compile(r"^(\d+)\.\.(\d+)$")


@dataclass(frozen=True)
class S3Settings:
    """Connection settings for an S3-compatible store (AWS S3, SeaweedFS, MinIO).

    A field left ``None`` is not passed on, so pyarrow, boto3 and LanceDB resolve it through the standard
    AWS chain (``AWS_PROFILE`` and ``~/.aws/config``, the instance role): no region is ever forced over it.
    """

    endpoint_url: str | None = None
    region: str | None = None
    access_key_id: str | None = None
    secret_access_key: str | None = None
    session_token: str | None = None

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None) -> S3Settings:
        """Read the standard AWS variables (``AWS_ENDPOINT_URL_S3`` wins over ``AWS_ENDPOINT_URL``)."""
        env = os.environ if environ is None else environ
        return cls(
            endpoint_url=env.get("AWS_ENDPOINT_URL_S3") or env.get("AWS_ENDPOINT_URL") or None,
            region=env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION") or None,
            access_key_id=env.get("AWS_ACCESS_KEY_ID") or None,
            secret_access_key=env.get("AWS_SECRET_ACCESS_KEY") or None,
            session_token=env.get("AWS_SESSION_TOKEN") or None,
        )

    def pyarrow_filesystem(self) -> pafs.S3FileSystem:
        kwargs: dict[str, object] = {}
        if self.region:
            kwargs["region"] = self.region
        if self.endpoint_url:
            endpoint = urlparse(self.endpoint_url)
            if not endpoint.scheme or not endpoint.netloc:
                raise ValueError(f"S3 endpoint must look like http(s)://host:port, got {self.endpoint_url!r}")
            kwargs["scheme"] = endpoint.scheme
            kwargs["endpoint_override"] = endpoint.netloc
        if self.access_key_id:
            kwargs["access_key"] = self.access_key_id
            kwargs["secret_key"] = self.secret_access_key
            kwargs["session_token"] = self.session_token
        return pafs.S3FileSystem(**kwargs)

    def boto3_client(self):  # -> a botocore S3 client (boto3 is imported only when S3 is listed)
        """A boto3 S3 client with these settings, for what pyarrow does not expose (object ETags).

        A custom endpoint is addressed path-style, as pyarrow addresses it (SeaweedFS, MinIO)."""
        import boto3
        from botocore.config import Config

        return boto3.client(
            "s3", endpoint_url=self.endpoint_url, region_name=self.region,
            aws_access_key_id=self.access_key_id, aws_secret_access_key=self.secret_access_key,
            aws_session_token=self.session_token,
            config=Config(s3={"addressing_style": "path"}) if self.endpoint_url else None,
        )

    def storage_options(self) -> dict[str, str]:
        """The same settings as object_store options (LanceDB, polars)."""
        options = {}
        if self.region:
            options["region"] = self.region
        if self.endpoint_url:
            options["endpoint"] = self.endpoint_url
            if self.endpoint_url.startswith("http://"):
                options["allow_http"] = "true"
        if self.access_key_id:
            options["aws_access_key_id"] = self.access_key_id
            options["aws_secret_access_key"] = self.secret_access_key or ""
        if self.session_token:
            options["aws_session_token"] = self.session_token
        return options


def is_s3(uri: str) -> bool:
    return uri.startswith(S3_SCHEME)


def is_local(uri: str) -> bool:
    """A path on this machine (``file://`` included): what ``Path``, ``mkdir`` and ``os.rename`` can handle."""
    return "://" not in uri or uri.startswith(FILE_SCHEME)


def _local_path(uri: str) -> str:
    return str(Path(uri.removeprefix(FILE_SCHEME)).expanduser().resolve())


def filesystem_for(uri: str, s3: S3Settings | None = None) -> tuple[pafs.FileSystem, str]:
    """Resolve ``uri`` to ``(filesystem, path)``; local paths are made absolute."""
    if is_s3(uri):
        path = uri[len(S3_SCHEME) :].strip("/")
        if not path:
            raise ValueError(f"S3 URI needs a bucket: {uri!r}")
        return (s3 or S3Settings.from_env()).pyarrow_filesystem(), path
    if is_local(uri):
        return pafs.LocalFileSystem(), _local_path(uri)
    return _fsspec_filesystem(uri)


def _fsspec_filesystem(uri: str) -> tuple[pafs.FileSystem, str]:
    """Any other scheme through fsspec (chained URLs too), so every scheme fsspec knows works as it does in
    img2dataset and webdataset; a scheme it lacks, or whose package is missing, is a ValueError saying so."""
    scheme = uri.split("://", 1)[0]
    unknown = [protocol for protocol in scheme.split("::") if protocol not in fsspec.available_protocols()]
    if unknown:
        raise ValueError(f"unsupported URI scheme {unknown[0]}:// in {uri!r}: use a local path, s3:// or a scheme "
                         "fsspec knows, installing its package (gcsfs for gs://, adlfs for az:// and abfs(s)://)")
    try:
        filesystem, path = fsspec.core.url_to_fs(uri)
    except ImportError as error:  # fsspec knows the scheme, its package (gcsfs, adlfs, ...) is not installed
        raise ValueError(f"{scheme}:// URIs need an fsspec package that is not installed: {error}") from error
    return pafs.PyFileSystem(pafs.FSSpecHandler(filesystem)), path


def absolute(uri: str) -> str:
    """A remote URI as it is; a local path or ``file://`` URI as an absolute path (``~`` expanded), so it means
    the same from any working directory and ``Path`` can take it."""
    return _local_path(uri) if is_local(uri) else uri


def join(uri: str, *parts: str) -> str:
    """Join path components onto a URI without resolving anything."""
    if "://" not in uri:
        return str(Path(uri, *parts))
    scheme, _, path = uri.partition("://")
    return f"{scheme}://" + posixpath.join(path.rstrip("/"), *parts)


def expand_braces(pattern: str) -> list[str]:
    """Every name a webdataset / img2dataset brace pattern stands for, in order: ``{00000..00127}`` counts
    (zero-padded bounds keep their width), ``{a,b}`` alternates, groups multiply and may nest."""
    start = pattern.find("{")
    if start < 0:
        if "}" in pattern:
            raise ValueError(f"unbalanced braces in {pattern!r}")
        return [pattern]
    end = _closing_brace(pattern, start)
    tails = expand_braces(pattern[end + 1 :])
    return [pattern[:start] + choice + tail for choice in _brace_choices(pattern, pattern[start + 1 : end])
            for tail in tails]


def _closing_brace(pattern: str, start: int) -> int:
    depth = 0
    for index in range(start, len(pattern)):
        depth += {"{": 1, "}": -1}.get(pattern[index], 0)
        if depth == 0:
            return index
    raise ValueError(f"unbalanced braces in {pattern!r}")


def _brace_choices(pattern: str, body: str) -> list[str]:
    if match := _RANGE.match(body):
        first, last = match.groups()
        padded = any(len(bound) > 1 and bound.startswith("0") for bound in (first, last))
        width = max(len(first), len(last)) if padded else 0
        step = 1 if int(first) <= int(last) else -1
        return [str(number).zfill(width) for number in range(int(first), int(last) + step, step)]
    alternatives = _top_level_split(body)
    if len(alternatives) < 2:
        raise ValueError(f"{{{body}}} in {pattern!r} is neither a range {{a..b}} nor a list {{a,b}}")
    return [name for alternative in alternatives for name in expand_braces(alternative)]


def _top_level_split(body: str) -> list[str]:
    """``body`` split at the commas outside nested braces."""
    parts, depth, current = [], 0, ""
    for character in body:
        depth += {"{": 1, "}": -1}.get(character, 0)
        if character == "," and depth == 0:
            parts.append(current)
            current = ""
        else:
            current += character
    return [*parts, current]


@dataclass(frozen=True)
class FileEntry:
    """A listed file: its URI, size, modification time and, from :func:`list_objects` on S3, its ETag
    (what a checksum cache keys on)."""

    uri: str
    size: int
    mtime_ns: int | None
    etag: str | None = None


def list_files(uri: str, s3: S3Settings | None = None) -> Iterator[FileEntry]:
    """Files directly under ``uri`` (not recursive), sorted by name, each named as :func:`join` names it."""
    fs, path = filesystem_for(uri, s3)
    root = absolute(uri)
    infos = fs.get_file_info(pafs.FileSelector(path, allow_not_found=False, recursive=False))
    for info in sorted(infos, key=lambda i: i.path):
        if info.type == pafs.FileType.File:
            yield FileEntry(join(root, info.base_name), int(info.size), info.mtime_ns)


def list_objects(uri: str, s3: S3Settings | None = None, name_prefix: str = "") -> Iterator[FileEntry]:
    """Files directly under ``uri`` whose names start with ``name_prefix``, sorted by name; on S3 with each
    object's ETag, which the listing returns with size and mtime at no extra request, so a checksum cache
    can tell a re-upload from the same object without reading it. On S3 only the prefix is listed, and a
    missing prefix lists nothing (S3 has no folders)."""
    if not is_s3(uri):
        for entry in list_files(uri, s3):
            if entry.uri.rsplit("/", 1)[-1].startswith(name_prefix):
                yield entry
        return
    bucket, _, prefix = uri[len(S3_SCHEME) :].strip("/").partition("/")
    prefix = f"{prefix}/" if prefix else ""
    pages = (s3 or S3Settings.from_env()).boto3_client().get_paginator("list_objects_v2").paginate(
        Bucket=bucket, Prefix=prefix + name_prefix, Delimiter="/")
    objects = [item for page in pages for item in page.get("Contents", []) if not item["Key"].endswith("/")]
    for item in sorted(objects, key=lambda listed: listed["Key"]):
        mtime_ns = (item["LastModified"] - _EPOCH) // timedelta(microseconds=1) * 1000
        yield FileEntry(f"{S3_SCHEME}{bucket}/{item['Key']}", int(item["Size"]), mtime_ns, item["ETag"].strip('"'))


def file_entry(uri: str, s3: S3Settings | None = None) -> FileEntry | None:
    fs, path = filesystem_for(uri, s3)
    info = fs.get_file_info(path)
    if info.type != pafs.FileType.File:
        return None
    return FileEntry(absolute(uri), int(info.size), info.mtime_ns)


def exists(uri: str, s3: S3Settings | None = None) -> bool:
    fs, path = filesystem_for(uri, s3)
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def open_input(uri: str, s3: S3Settings | None = None, buffer_size: int = 1 << 20) -> pafs.NativeFile:
    """A sequential, buffered read stream: the whole object is never loaded at once."""
    fs, path = filesystem_for(uri, s3)
    return fs.open_input_stream(path, buffer_size=buffer_size)


def read_bytes(uri: str, s3: S3Settings | None = None) -> bytes:
    with open_input(uri, s3) as stream:
        return stream.read()


def write_bytes_atomic(uri: str, data: bytes, s3: S3Settings | None = None) -> None:
    """Write ``data`` so that readers see the old file or the new one, never a partial one.

    Locally a temporary sibling is renamed over the target; on S3 a single PUT (or a completed
    multipart upload) is already atomic.
    """
    fs, path = filesystem_for(uri, s3)
    if isinstance(fs, pafs.LocalFileSystem):
        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.{uuid.uuid4().hex}.tmp")
        try:
            with open(tmp, "wb") as handle:
                handle.write(data)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp, target)
        finally:
            tmp.unlink(missing_ok=True)
        return
    with fs.open_output_stream(path) as stream:
        stream.write(data)


def list_dirs(uri: str, s3: S3Settings | None = None) -> list[str]:
    """Names of the folders (S3: common prefixes) directly under ``uri``, sorted; [] if it does not exist."""
    fs, path = filesystem_for(uri, s3)
    infos = fs.get_file_info(pafs.FileSelector(path, allow_not_found=True, recursive=False))
    return sorted(info.base_name for info in infos if info.type == pafs.FileType.Directory)
