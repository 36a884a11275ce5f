"""Hand-made shards for tests: exact control over every tar member and parquet row, and the crafted
hostile shard (every kind of defect ingestion must account for) with the limits it is validated under."""

from __future__ import annotations

import io
import json
import os
import struct
import tarfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from curation_platform.validation import ValidationLimits


def jpeg_bytes(width: int = 64, height: int = 48, color: tuple[int, int, int] = (200, 30, 30)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), color).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def png_bomb_bytes(width: int = 100_000, height: int = 100_000) -> bytes:
    """A tiny PNG whose header declares a gigantic canvas (a decompression bomb)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


@dataclass
class ShardBuilder:
    """Collects tar members and parquet rows, then writes ``NAME.tar`` + ``NAME.parquet``."""

    name: str = "00000"
    members: list[tarfile.TarInfo | tuple[tarfile.TarInfo, bytes]] = field(default_factory=list)
    rows: list[dict] = field(default_factory=list)

    def file(self, name: str, data: bytes) -> ShardBuilder:
        info = tarfile.TarInfo(name)
        info.size = len(data)
        info.mtime = 1_700_000_000
        self.members.append((info, data))
        return self

    def special(self, name: str, kind: bytes, linkname: str = "") -> ShardBuilder:
        info = tarfile.TarInfo(name)
        info.type = kind
        info.linkname = linkname
        self.members.append(info)
        return self

    def sample(self, key: str, caption: str | bytes, image: bytes | None = None, uid: str | None = None,
               row: bool = True, status: str = "success") -> ShardBuilder:
        image = jpeg_bytes() if image is None else image
        meta = {"key": key, "caption": caption if isinstance(caption, str) else None, "url": f"http://x/{key}"}
        if uid:
            meta["uid"] = uid
        self.file(f"{key}.jpg", image)
        self.file(f"{key}.txt", caption.encode() if isinstance(caption, str) else caption)
        self.file(f"{key}.json", json.dumps(meta).encode())
        if row:
            self.row(key, uid=uid, status=status)
        return self

    def row(self, key: str, uid: str | None = None, status: str = "success") -> ShardBuilder:
        self.rows.append({"key": key, "uid": uid, "url": f"http://x/{key}", "caption": "c", "status": status,
                          "error_message": None if status == "success" else "HTTP 404"})
        return self

    def write(self, directory: Path) -> Path:
        directory.mkdir(parents=True, exist_ok=True)
        with tarfile.open(directory / f"{self.name}.tar", "w", format=tarfile.GNU_FORMAT) as archive:
            for member in self.members:
                if isinstance(member, tuple):
                    archive.addfile(member[0], io.BytesIO(member[1]))
                else:
                    archive.addfile(member)
        schema = pa.schema([("key", pa.string()), ("uid", pa.string()), ("url", pa.string()),
                            ("caption", pa.string()), ("status", pa.string()), ("error_message", pa.string())])
        pq.write_table(pa.Table.from_pylist(self.rows, schema=schema), directory / f"{self.name}.parquet")
        return directory


UID = "0123456789abcdef0123456789abcdef"
LIMITS = ValidationLimits(max_image_bytes=200_000, min_image_side=16)


def hostile_shard(directory: Path) -> Path:
    """Write the hostile shard ``00000`` into ``directory`` (returned): three good samples, every other
    member or row one defect (unsafe paths and member types, a bomb, bad text, duplicates, missing halves)."""
    b = ShardBuilder()
    b.sample("000000000", "a red square on white", uid="a" * 32)
    b.file("../../escaped.jpg", jpeg_bytes()).file("/tmp/absolute_escape.txt", b"pwned")
    b.file("000000001.txt", b"a symlinked image").special("000000001.jpg", tarfile.SYMTYPE, "/etc/passwd").row("000000001")
    b.file("000000002.txt", b"hard link").special("000000002.jpg", tarfile.LNKTYPE, "000000000.jpg").row("000000002")
    b.special("000000003.jpg", tarfile.CHRTYPE).row("000000003")
    b.special("000000004.jpg", tarfile.FIFOTYPE).row("000000004")
    b.sample("000000005", "a decompression bomb", image=png_bomb_bytes())
    b.sample("000000006", "a truncated jpeg", image=jpeg_bytes(128, 128)[:300])
    b.sample("000000007", b"caption \xff\xfe not utf-8")
    b.row("000000008").row("000000009", status="failed_to_download")  # parquet rows without members
    b.sample("000000010", "first holder of the uid", uid=UID)
    b.sample("000000011", "second holder of the uid", uid=UID)
    b.sample("000000012", "a sample the parquet does not know", row=False)
    b.sample("000000013", "an oversize image", image=os.urandom(300_000))
    b.sample("000000014", "a tiny image", image=jpeg_bytes(8, 8))
    b.sample("000000015", "   ")
    b.sample("000000016", "bad uid", uid="not-a-uid")
    b.file("000000017.jpg", jpeg_bytes()).file("000000017.txt", b"bad json").file("000000017.json", b"{oops").row("000000017")
    b.file("README", b"no key.ext form")
    b.file("000000018.txt", b"caption without an image").row("000000018")
    b.sample("sub/000000019", "a good sample in a sub folder")
    b.file("000000000.txt", b"the key of sample 0 again, after other keys")
    return b.write(directory)
