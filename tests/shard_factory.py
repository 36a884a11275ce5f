"""Hand-made shards for tests: exact control over every tar member and parquet row."""

from __future__ import annotations

import io
import json
import struct
import tarfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image


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
