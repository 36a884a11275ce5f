"""The hostile shard corpus: every single-shard attack on ingestion, each with the outcome it must have.

Each :class:`HostileCase` writes one shard (``00000.tar`` and usually ``00000.parquet``, img2dataset layout) into
a pool directory and says what ``ingest_shard(shard, limits=LIMITS)`` must make of it: how many samples are
accepted, how many are quarantined under which reason code, and which shard-level error (if any) the report
carries. ``tests/test_hostile_corpus.py`` ingests every case in CI; a new hostile input is one more entry in
:data:`CASES`, and a new :class:`~curation_platform.reasons.Reason` without a case here fails that test unless it
is listed in :data:`NOT_IN_CORPUS` with the reason why.

Cases are isolated on purpose (one defect per shard, next to a good sample where that shows the defect stays
local), so a count pins the reason of one known sample; ``kitchen_sink`` is the crafted all-in-one shard of
``tests/helpers/shards.py`` that checks the defects do not disturb one another.
"""

from __future__ import annotations

import bz2
import gzip
import io
import json
import lzma
import tarfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from curation_platform.reasons import Reason
from curation_platform.shard_reader import MAX_HEADER_BYTES
from tests.helpers.shards import UID, ShardBuilder, hostile_shard, jpeg_bytes, png_bomb_bytes

SHARD = "00000"


@dataclass(frozen=True)
class HostileCase:
    """One hostile shard and its expected ingestion outcome (under ``tests.helpers.shards.LIMITS``)."""

    name: str
    build: Callable[[Path], None]  # writes shard 00000 into the pool directory it is given
    reasons: dict[str, int]  # quarantine reason code -> count, exactly (no other reason may appear)
    accepted: int
    shard_error: str | None = None  # substring of one of report.errors; None: report.errors must be empty
    about: str = ""
    max_seconds: float = 30.0  # ingest_shard must return within this (a bounded-work guarantee, not a benchmark)

    def __post_init__(self) -> None:
        unknown = set(self.reasons) - {reason.value for reason in Reason}
        if unknown:
            raise ValueError(f"case {self.name!r}: unknown reason codes {sorted(unknown)}")


CASES: list[HostileCase] = []

# Reason codes no single-shard case can produce, each with why (compared against ``Reason`` at run time, so a
# code listed here that the enum does not have yet is simply ignored).
NOT_IN_CORPUS: dict[str, str] = {
    "cross_shard_duplicate": "needs two shards: tests/test_pool_accounting.py",
}


def case(name: str, *, accepted: int, reasons: dict[str, int] | None = None, shard_error: str | None = None,
         about: str = "", **options) -> Callable[[Callable[[Path], None]], Callable[[Path], None]]:
    """Register the decorated ``build(pool_dir)`` as a hostile case (``options``: the other HostileCase fields)."""

    def register(build: Callable[[Path], None]) -> Callable[[Path], None]:
        CASES.append(HostileCase(name, build, dict(reasons or {}), accepted, shard_error,
                                 about or " ".join((build.__doc__ or "").split()), **options))
        return build

    return register


# --- building blocks ------------------------------------------------------------------------------------------


def _good(builder: ShardBuilder, key: str = "000000001") -> ShardBuilder:
    return builder.sample(key, f"a good sample {key}")


def _samples(count: int) -> ShardBuilder:
    builder = ShardBuilder()
    for index in range(count):
        builder.sample(f"{index:09d}", f"sample number {index}", image=jpeg_bytes(64, 64 + index))
    return builder


def _write_parquet(pool: Path, rows: list[dict], fields: list[tuple[str, pa.DataType]]) -> None:
    pq.write_table(pa.Table.from_pylist(rows, schema=pa.schema(fields)), pool / f"{SHARD}.parquet")


def _image(fmt: str, size: tuple[int, int] = (64, 64), mode: str = "RGB") -> bytes:
    buffer = io.BytesIO()
    Image.new(mode, size).save(buffer, format=fmt)
    return buffer.getvalue()


def _cut(pool: Path, member: str, *, into_header: bool = False) -> None:
    """Cut the tar inside ``member``'s data (or inside its header), as a crashed or partial upload would."""
    tar = pool / f"{SHARD}.tar"
    with tarfile.open(tar) as archive:
        info = archive.getmember(member)
    end = info.offset + 100 if into_header else info.offset_data + info.size // 2
    tar.write_bytes(tar.read_bytes()[:end])


def _recompress(pool: Path, compress: Callable[[bytes], bytes]) -> None:
    tar = pool / f"{SHARD}.tar"
    tar.write_bytes(compress(tar.read_bytes()))


def _raw_tar(pool: Path, members: list[tuple[tarfile.TarInfo, bytes | None]], fmt: int = tarfile.GNU_FORMAT) -> None:
    pool.mkdir(parents=True, exist_ok=True)
    with tarfile.open(pool / f"{SHARD}.tar", "w", format=fmt) as archive:
        for info, data in members:
            archive.addfile(info, None if data is None else io.BytesIO(data))


def _info(name: str, size: int = 0, **attributes) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size, info.mtime = size, 1_700_000_000
    for attribute, value in attributes.items():
        setattr(info, attribute, value)
    return info


def _gzip_bomb() -> bytes:
    """A gzip stream of a tar whose one member claims 4 GiB of zeros: 4 MiB on disk, 4 GiB inflated.

    Concatenated gzip members are one valid gzip file, so the bomb costs one 16 MiB compression to build."""
    header = tarfile.TarInfo("000000001.jpg")
    header.size = 4 << 30
    chunk = gzip.compress(bytes(16 << 20), compresslevel=9, mtime=0)
    return gzip.compress(header.tobuf(tarfile.GNU_FORMAT), mtime=0) + chunk * ((4 << 30) // (16 << 20))


# --- the whole file is not a plain tar ------------------------------------------------------------------------


@case("gzip_tar", accepted=0, reasons={Reason.MISSING_MEMBER: 2}, max_seconds=10,
      shard_error="compressed_tar: the shard is a gzip-compressed")
def _gzip_tar(pool: Path) -> None:
    """a gzip'd tar named .tar: refused whole (no half acceptance), its parquet rows missing_member"""
    _good(_good(ShardBuilder(), "000000001"), "000000002").write(pool)
    _recompress(pool, gzip.compress)


@case("bzip2_tar", accepted=0, reasons={Reason.MISSING_MEMBER: 1}, max_seconds=10,
      shard_error="compressed_tar: the shard is a bzip2-compressed")
def _bzip2_tar(pool: Path) -> None:
    """a bzip2'd tar named .tar"""
    _good(ShardBuilder()).write(pool)
    _recompress(pool, bz2.compress)


@case("xz_tar", accepted=0, reasons={Reason.MISSING_MEMBER: 1}, max_seconds=10,
      shard_error="compressed_tar: the shard is a xz-compressed")
def _xz_tar(pool: Path) -> None:
    """an xz'd tar named .tar"""
    _good(ShardBuilder()).write(pool)
    _recompress(pool, lzma.compress)


@case("zstd_magic_tar", accepted=0, reasons={Reason.MISSING_MEMBER: 1}, max_seconds=10,
      shard_error="compressed_tar: the shard is a zstd-compressed")
def _zstd_magic_tar(pool: Path) -> None:
    """a file starting with the zstd magic number (refused on the magic alone, never decompressed)"""
    _good(ShardBuilder()).write(pool)
    _recompress(pool, lambda data: b"\x28\xb5\x2f\xfd" + data)


@case("gzip_bomb", accepted=0, reasons={Reason.MISSING_MEMBER: 1}, max_seconds=10,
      shard_error="compressed_tar: the shard is a gzip-compressed")
def _gzip_bomb_tar(pool: Path) -> None:
    """4 MiB of gzip inflating to a 4 GiB tar member: refused on the magic, nothing inflated"""
    ShardBuilder().row("000000001").write(pool)
    (pool / f"{SHARD}.tar").write_bytes(_gzip_bomb())


@case("garbage_tar", accepted=0, reasons={Reason.MISSING_MEMBER: 2}, shard_error="tar unreadable")
def _garbage_tar(pool: Path) -> None:
    """text where the tar should be: a shard error, the parquet rows missing_member"""
    ShardBuilder().row("000000001").row("000000002").write(pool)
    (pool / f"{SHARD}.tar").write_bytes(b"this is not a tar file at all" * 50)


@case("empty_tar_file", accepted=0, reasons={Reason.MISSING_MEMBER: 1}, shard_error="empty file")
def _empty_tar_file(pool: Path) -> None:
    """a zero-byte .tar"""
    ShardBuilder().row("000000001").write(pool)
    (pool / f"{SHARD}.tar").write_bytes(b"")


@case("parquet_without_tar", accepted=0, reasons={Reason.MISSING_MEMBER: 1, Reason.NOT_DOWNLOADED: 1},
      shard_error="shard has no tar file")
def _parquet_without_tar(pool: Path) -> None:
    """only the parquet of a shard: its rows are still accounted for"""
    ShardBuilder().row("000000001").row("000000002", status="failed_to_download").write(pool)
    (pool / f"{SHARD}.tar").unlink()


# --- tar headers ---------------------------------------------------------------------------------------------


@case("gnu_long_name_over_limit", accepted=0, shard_error="GNU long-name header")
def _gnu_long_name(pool: Path) -> None:
    """a GNU long-name header of 256 KiB (limit 64 KiB): refused, not read into memory (no parquet)"""
    _raw_tar(pool, [(_info("k" * (4 * MAX_HEADER_BYTES) + ".jpg", 3), b"abc")])


@case("gnu_long_link_over_limit", accepted=0, reasons={Reason.TRUNCATED_SHARD: 1, Reason.MISSING_MEMBER: 1},
      shard_error="GNU long-name header")
def _gnu_long_link(pool: Path) -> None:
    """a GNU long-link header above the limit after a good sample: the sample being read is truncated_shard,
    the rows after the break missing_member"""
    builder = _good(ShardBuilder()).row("000000002")
    builder.members.append(_info("000000002.jpg", type=tarfile.SYMTYPE, linkname="l" * (2 * MAX_HEADER_BYTES)))
    builder.write(pool)


@case("pax_header_over_limit", accepted=0, reasons={Reason.MISSING_MEMBER: 1}, shard_error="PAX header")
def _pax_header(pool: Path) -> None:
    """a PAX extended header of 128 KiB (a long name in PAX format)"""
    ShardBuilder().row("000000001").write(pool)
    _raw_tar(pool, [(_info("p" * (2 * MAX_HEADER_BYTES) + ".jpg", 3), b"abc")], fmt=tarfile.PAX_FORMAT)


@case("pax_global_header_over_limit", accepted=0, reasons={Reason.MISSING_MEMBER: 1}, shard_error="PAX header")
def _pax_global_header(pool: Path) -> None:
    """a PAX global header of 128 KiB"""
    ShardBuilder().row("000000001").write(pool)
    pool.mkdir(parents=True, exist_ok=True)
    with tarfile.open(pool / f"{SHARD}.tar", "w", format=tarfile.PAX_FORMAT,
                      pax_headers={"comment": "g" * (2 * MAX_HEADER_BYTES)}) as archive:
        archive.addfile(_info("000000001.txt", 3), io.BytesIO(b"abc"))


@case("pax_header_within_limit", accepted=1)
def _pax_within_limit(pool: Path) -> None:
    """control: a PAX tar (as this repo's img2dataset writer makes) with a 300-character key is read normally"""
    key = "d" * 300
    caption, meta = b"a long key", json.dumps({"key": key, "url": "http://x/long"}).encode()
    members = [(_info(f"{key}.{ext}", len(data)), data) for ext, data in
               (("jpg", jpeg_bytes()), ("txt", caption), ("json", meta))]
    _raw_tar(pool, members, fmt=tarfile.PAX_FORMAT)


# --- a tar cut short -----------------------------------------------------------------------------------------


@case("truncated_inside_member", accepted=3, reasons={Reason.TRUNCATED_SHARD: 1, Reason.MISSING_MEMBER: 2},
      shard_error="tar unreadable")
def _truncated_inside_member(pool: Path) -> None:
    """six samples, the tar cut in the middle of sample 3's image: 0-2 accepted, 3 truncated, 4-5 missing"""
    _samples(6).write(pool)
    _cut(pool, "000000003.jpg")


@case("truncated_inside_header", accepted=2, reasons={Reason.TRUNCATED_SHARD: 1, Reason.MISSING_MEMBER: 3},
      shard_error="no end-of-archive block")
def _truncated_inside_header(pool: Path) -> None:
    """the tar cut inside sample 3's first header (tarfile reads that as a clean end): the sample being
    assembled (2) is truncated_shard, 3-5 missing_member"""
    _samples(6).write(pool)
    _cut(pool, "000000003.jpg", into_header=True)


@case("truncated_between_members", accepted=3, reasons={Reason.TRUNCATED_SHARD: 1},
      shard_error="no end-of-archive block")
def _truncated_between_members(pool: Path) -> None:
    """four samples, the tar cut right after the last member (no end-of-archive blocks): tarfile reads it as
    complete, ingestion must not; the last sample is truncated_shard"""
    _samples(4).write(pool)
    tar = pool / f"{SHARD}.tar"
    with tarfile.open(tar) as archive:
        last = archive.getmembers()[-1]
    end = last.offset_data + -(-last.size // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE
    tar.write_bytes(tar.read_bytes()[:end])


# --- member paths and types ----------------------------------------------------------------------------------


@case("unsafe_member_paths", accepted=1, reasons={Reason.UNSAFE_MEMBER_PATH: 7})
def _unsafe_member_paths(pool: Path) -> None:
    """'..' climbs, absolute and drive paths, backslashes, control characters: each one quarantined entry,
    nothing extracted, the good sample untouched"""
    builder = _good(ShardBuilder())
    for name in ("../../escaped.jpg", "/tmp/absolute_escape.txt", "sub/../../climb.jpg", "C:/windows.jpg",
                 "sub\\000000002.jpg", "000000003\n.jpg", "000000004\x7f.txt"):
        builder.file(name, jpeg_bytes() if name.endswith(".jpg") else b"pwned")
    builder.write(pool)


@case("repeated_hostile_member_names", accepted=1,
      reasons={Reason.UNSAFE_MEMBER_PATH: 2, Reason.MALFORMED_MEMBER_NAME: 2})
def _repeated_hostile_names(pool: Path) -> None:
    """the same unsafe name twice and the same malformed name twice: each copy is its own quarantine row"""
    builder = _good(ShardBuilder())
    for name in ("../x.jpg", "../x.jpg", "README", "README"):
        builder.file(name, b"again")
    builder.write(pool)


@case("symlink_member", accepted=1, reasons={Reason.UNSAFE_MEMBER_TYPE: 1})
def _symlink(pool: Path) -> None:
    """KEY.jpg is a symlink to /etc/passwd"""
    builder = _good(ShardBuilder()).file("000000002.txt", b"a symlinked image")
    builder.special("000000002.jpg", tarfile.SYMTYPE, "/etc/passwd").row("000000002").write(pool)


@case("hard_link_member", accepted=1, reasons={Reason.UNSAFE_MEMBER_TYPE: 1})
def _hard_link(pool: Path) -> None:
    """KEY.jpg is a hard link to another sample's image"""
    builder = _good(ShardBuilder()).file("000000002.txt", b"hard link")
    builder.special("000000002.jpg", tarfile.LNKTYPE, "000000001.jpg").row("000000002").write(pool)


@case("char_device_member", accepted=1, reasons={Reason.UNSAFE_MEMBER_TYPE: 1})
def _char_device(pool: Path) -> None:
    """KEY.jpg is a character device"""
    _good(ShardBuilder()).special("000000002.jpg", tarfile.CHRTYPE).row("000000002").write(pool)


@case("block_device_member", accepted=1, reasons={Reason.UNSAFE_MEMBER_TYPE: 1})
def _block_device(pool: Path) -> None:
    """KEY.jpg is a block device"""
    _good(ShardBuilder()).special("000000002.jpg", tarfile.BLKTYPE).row("000000002").write(pool)


@case("fifo_member", accepted=1, reasons={Reason.UNSAFE_MEMBER_TYPE: 1})
def _fifo(pool: Path) -> None:
    """KEY.jpg is a fifo"""
    _good(ShardBuilder()).special("000000002.jpg", tarfile.FIFOTYPE).row("000000002").write(pool)


@case("malformed_member_names", accepted=1, reasons={Reason.MALFORMED_MEMBER_NAME: 4})
def _malformed_names(pool: Path) -> None:
    """README, .jpg, sub/.hidden, trailing-dot.: no KEY.EXT form"""
    builder = _good(ShardBuilder())
    for name in ("README", ".jpg", "sub/.hidden", "trailing-dot."):
        builder.file(name, b"no key.ext form")
    builder.write(pool)


@case("directory_entries_and_sub_folders", accepted=2)
def _directories(pool: Path) -> None:
    """control: directory entries are skipped and a key in a sub folder is a key"""
    builder = _good(ShardBuilder()).file("000000001.cls", b"an unknown extension: ignored")
    builder.special("sub", tarfile.DIRTYPE).sample("sub/000000002", "a good sample in a sub folder").write(pool)


@case("member_claims_8_gib", accepted=1, reasons={Reason.OVERSIZE_MEMBER: 1},
      shard_error="inside a member its header declared", max_seconds=5)
def _member_claims_8_gib(pool: Path) -> None:
    """a header claiming an 8 GiB image with no data behind it: skipped unread, the tar's end reported"""
    builder = _good(ShardBuilder()).file("000000002.txt", b"a huge image").row("000000002")
    builder.members.append(_info("000000002.jpg", 8 << 30))
    builder.write(pool)


@case("ignored_member_claims_8_tib", accepted=1, reasons={Reason.TRUNCATED_SHARD: 1}, shard_error="inside a member its header declared",
      max_seconds=5)
def _ignored_member_claims_8_tib(pool: Path) -> None:
    """a member of an ignored extension claiming 8 TiB (the GNU size field allows it) from a 10 KiB tar"""
    builder = _good(ShardBuilder())
    builder.members.append(_info("000000002.bin", 8 << 40))
    builder.write(pool)


@case("oversize_image_member", accepted=1, reasons={Reason.OVERSIZE_MEMBER: 1})
def _oversize_image(pool: Path) -> None:
    """a 300,000-byte image (limit 200,000 in LIMITS)"""
    _good(ShardBuilder()).sample("000000002", "an oversize image", image=b"\xff" * 300_000).write(pool)


@case("oversize_text_member", accepted=1, reasons={Reason.OVERSIZE_MEMBER: 1})
def _oversize_text(pool: Path) -> None:
    """a caption of 1 MiB + 1 byte (text limit 1 MiB)"""
    _good(ShardBuilder()).sample("000000002", "x" * ((1 << 20) + 1)).write(pool)


@case("duplicate_image_member", accepted=1, reasons={Reason.DUPLICATE_MEMBER: 1})
def _duplicate_image(pool: Path) -> None:
    """KEY.jpg and KEY.png in one sample"""
    builder = _good(ShardBuilder()).file("000000002.png", _image("PNG"))
    builder.sample("000000002", "two images").write(pool)


@case("duplicate_text_member", accepted=1, reasons={Reason.DUPLICATE_MEMBER: 1})
def _duplicate_text(pool: Path) -> None:
    """KEY.txt twice in a row"""
    _good(ShardBuilder()).file("000000002.txt", b"first caption").sample("000000002", "second").write(pool)


@case("many_tiny_members", accepted=1, reasons={Reason.MISSING_IMAGE: 20_000})
def _many_tiny_members(pool: Path) -> None:
    """20,000 one-byte caption-only samples and a good one last: per-member work and memory stay bounded"""
    builder = ShardBuilder()
    for index in range(20_000):
        builder.file(f"{index:09d}.txt", b"c").row(f"{index:09d}")
    _good(builder, "999999999").write(pool)


# --- tar and parquet disagree --------------------------------------------------------------------------------


@case("missing_parquet_row", accepted=1, reasons={Reason.MISSING_PARQUET_ROW: 1})
def _missing_parquet_row(pool: Path) -> None:
    """a tar sample the parquet does not know"""
    _good(ShardBuilder()).sample("000000002", "unknown to the parquet", row=False).write(pool)


@case("missing_members", accepted=1, reasons={Reason.MISSING_MEMBER: 1})
def _missing_members(pool: Path) -> None:
    """a parquet row with status success and no members in the tar"""
    _good(ShardBuilder()).row("000000002").write(pool)


@case("not_downloaded_row", accepted=1, reasons={Reason.NOT_DOWNLOADED: 1})
def _not_downloaded(pool: Path) -> None:
    """a parquet row with status failed_to_download (and no members)"""
    _good(ShardBuilder()).row("000000002", status="failed_to_download").write(pool)


@case("parquet_status_int64", accepted=0, reasons={Reason.INVALID_METADATA: 3})
def _parquet_status_int64(pool: Path) -> None:
    """status as an int64 column: 0 and 1 without members and 0 with members are all invalid_metadata
    (an int status is neither success nor a failure)"""
    ShardBuilder().sample("000000003", "a red circle", row=False).write(pool)
    _write_parquet(pool, [{"key": "000000001", "status": 0}, {"key": "000000002", "status": 1},
                          {"key": "000000003", "status": 0}], [("key", pa.string()), ("status", pa.int64())])


@case("failed_status_with_members_present", accepted=2, reasons={})
def _failed_status_with_members(pool: Path) -> None:
    """status failed_to_download although the tar holds the sample: the tar wins, the report warns"""
    _good(ShardBuilder()).sample("000000002", "present anyway", status="failed_to_download").write(pool)


@case("parquet_unreadable", accepted=0, reasons={Reason.MISSING_PARQUET_ROW: 2}, shard_error="parquet unreadable")
def _parquet_unreadable(pool: Path) -> None:
    """garbage bytes where the parquet should be: every tar sample missing_parquet_row"""
    _good(_good(ShardBuilder(), "000000001"), "000000002").write(pool)
    (pool / f"{SHARD}.parquet").write_bytes(b"PAR1 but not really" * 10)


@case("parquet_without_key_column", accepted=0, reasons={Reason.MISSING_PARQUET_ROW: 1},
      shard_error="parquet has no 'key' column")
def _parquet_without_key(pool: Path) -> None:
    """a parquet without a key column cannot be joined"""
    _good(ShardBuilder()).write(pool)
    _write_parquet(pool, [{"url": "http://x/1", "status": "success"}], [("url", pa.string()), ("status", pa.string())])


@case("parquet_key_zero_is_a_key", accepted=1)
def _parquet_key_zero(pool: Path) -> None:
    """an int64 parquet key 0 is the key "0", not a missing key: one sample, not a row plus an orphan"""
    ShardBuilder().sample("0", "a red circle", row=False).write(pool)
    _write_parquet(pool, [{"key": 0, "url": "http://x/0", "caption": "c", "status": "success", "error_message": None}],
                   [("key", pa.int64()), ("url", pa.string()), ("caption", pa.string()), ("status", pa.string()),
                    ("error_message", pa.string())])


@case("parquet_key_int64_loses_leading_zeros", accepted=0,
      reasons={Reason.MISSING_PARQUET_ROW: 1, Reason.MISSING_MEMBER: 1})
def _parquet_key_leading_zeros(pool: Path) -> None:
    """an int64 parquet key 1 does not join the tar key 000000001: both halves quarantined, the tar half's
    detail saying that the parquet's keys are integers"""
    ShardBuilder().sample("000000001", "a red circle", row=False).write(pool)
    _write_parquet(pool, [{"key": 1, "status": "success"}], [("key", pa.int64()), ("status", pa.string())])


@case("parquet_duplicate_and_keyless_rows", accepted=1, reasons={Reason.DUPLICATE_KEY: 1, Reason.MISSING_KEY: 2})
def _parquet_duplicate_rows(pool: Path) -> None:
    """a parquet key twice, a null key and an empty key: the repeat duplicate_key, the keyless rows missing_key,
    the sample accepted"""
    builder = _good(ShardBuilder()).row("000000001").row("")
    builder.rows.append({**builder.rows[0], "key": None})
    builder.write(pool)


# --- identity ------------------------------------------------------------------------------------------------


@case("duplicate_key_not_consecutive", accepted=2, reasons={Reason.DUPLICATE_KEY: 1})
def _duplicate_key(pool: Path) -> None:
    """key 1 again after key 2: the repeat is duplicate_key, the first holder stays accepted"""
    _good(_good(ShardBuilder(), "000000001"), "000000002").file("000000001.txt", b"key 1 again").write(pool)


@case("duplicate_key_three_times", accepted=3, reasons={Reason.DUPLICATE_KEY: 2})
def _duplicate_key_three_times(pool: Path) -> None:
    """the same key in three separate runs of members"""
    builder = _good(_good(ShardBuilder(), "000000001"), "000000002").file("000000001.txt", b"again")
    _good(builder, "000000003").file("000000001.txt", b"and again").write(pool)


@case("duplicate_uid", accepted=1, reasons={Reason.DUPLICATE_UID: 1})
def _duplicate_uid(pool: Path) -> None:
    """two samples claim the same uid: the second is duplicate_uid"""
    ShardBuilder().sample("000000001", "first holder", uid=UID).sample("000000002", "second holder", uid=UID).write(pool)


@case("uid_conflict", accepted=1, reasons={Reason.UID_CONFLICT: 1})
def _uid_conflict(pool: Path) -> None:
    """KEY.json and the parquet row give different uids"""
    builder = _good(ShardBuilder()).sample("000000002", "two uids", uid="a" * 32, row=False)
    builder.row("000000002", uid="b" * 32).write(pool)


@case("invalid_uid_in_json", accepted=1, reasons={Reason.INVALID_UID: 1})
def _invalid_uid_json(pool: Path) -> None:
    """uid 'not-a-uid' in KEY.json and the parquet"""
    _good(ShardBuilder()).sample("000000002", "bad uid", uid="not-a-uid").write(pool)


@case("invalid_uid_in_parquet", accepted=1, reasons={Reason.INVALID_UID: 1})
def _invalid_uid_parquet(pool: Path) -> None:
    """an upper-case hex uid in the parquet only"""
    _good(ShardBuilder()).sample("000000002", "upper-case uid", row=False).row("000000002", uid="A" * 32).write(pool)


@case("invalid_json", accepted=1, reasons={Reason.INVALID_JSON: 3})
def _invalid_json(pool: Path) -> None:
    """KEY.json that does not parse, is an array, or is not UTF-8"""
    builder = _good(ShardBuilder())
    for key, payload in (("000000002", b"{oops"), ("000000003", b"[1, 2]"), ("000000004", b'{"k": "\xff"}')):
        builder.file(f"{key}.jpg", jpeg_bytes()).file(f"{key}.txt", b"bad json").file(f"{key}.json", payload)
        builder.row(key)
    builder.write(pool)


def _json_drift(meta: dict) -> Callable[[Path], None]:
    """A json-only shard (no parquet: the json is the metadata) with one drifted sample and one good one."""

    def build(pool: Path) -> None:
        builder = ShardBuilder()
        for key, extra in (("000000001", {"url": "http://x/1"}), ("000000002", meta)):
            builder.file(f"{key}.jpg", jpeg_bytes()).file(f"{key}.txt", b"a red circle")
            builder.file(f"{key}.json", json.dumps({"key": key, **extra}).replace("Infinity", "1e400").encode())
        builder.write(pool)
        (pool / f"{SHARD}.parquet").unlink()

    return build


for _name, _meta in (("json_url_object", {"url": {"href": "x"}}), ("json_width_1e400", {"original_width": 1e400}),
                     ("json_width_2_pow_40", {"original_width": 2**40}), ("json_height_negative", {"original_height": -1}),
                     ("json_width_string", {"original_width": "64"}), ("json_width_bool", {"original_width": True}),
                     ("json_width_fractional", {"original_width": 64.5})):
    case(_name, accepted=1, reasons={Reason.INVALID_METADATA: 1},
         about=f"schema drift in a json-only shard: {_meta!r:.40}")(_json_drift(_meta))


@case("parquet_url_int64", accepted=0, reasons={Reason.INVALID_METADATA: 1})
def _parquet_url_int64(pool: Path) -> None:
    """schema drift: the parquet url column is int64"""
    ShardBuilder().sample("000000001", "a blue square").write(pool)
    _write_parquet(pool, [{"key": "000000001", "url": 5, "caption": "c", "status": "success", "error_message": None}],
                   [("key", pa.string()), ("url", pa.int64()), ("caption", pa.string()), ("status", pa.string()),
                    ("error_message", pa.string())])


@case("parquet_width_nan", accepted=0, reasons={Reason.INVALID_METADATA: 1})
def _parquet_width_nan(pool: Path) -> None:
    """schema drift: a float original_width column holding NaN"""
    ShardBuilder().sample("000000001", "a blue square").write(pool)
    _write_parquet(pool, [{"key": "000000001", "status": "success", "original_width": float("nan")}],
                   [("key", pa.string()), ("status", pa.string()), ("original_width", pa.float64())])


# --- content -------------------------------------------------------------------------------------------------


@case("pixel_bomb_png_header", accepted=1, reasons={Reason.DECOMPRESSION_BOMB: 1})
def _pixel_bomb(pool: Path) -> None:
    """a 100-byte PNG declaring 100,000 x 100,000 pixels (PIL's own bomb error)"""
    _good(ShardBuilder()).sample("000000002", "a decompression bomb", image=png_bomb_bytes()).write(pool)


@case("pixel_bomb_above_max_pixels", accepted=1, reasons={Reason.DECOMPRESSION_BOMB: 1})
def _pixel_bomb_max_pixels(pool: Path) -> None:
    """a PNG header declaring 7,000 x 7,000 = 49M pixels: below PIL's bomb limit, above max_pixels (40M)"""
    _good(ShardBuilder()).sample("000000002", "a quieter bomb", image=png_bomb_bytes(7_000, 7_000)).write(pool)


@case("image_side_400000", accepted=0, reasons={Reason.IMAGE_TOO_LARGE: 1})
def _image_side(pool: Path) -> None:
    """400,000 x 32 pixels: within the pixel limit, but resizing it would allocate gigabytes"""
    ShardBuilder().sample("000000001", "a long strip", image=_image("PNG", (400_000, 32), "L")).write(pool)


@case("undecodable_images", accepted=1, reasons={Reason.UNDECODABLE_IMAGE: 2})
def _undecodable(pool: Path) -> None:
    """a JPEG cut after 300 bytes and bytes of no image format"""
    builder = _good(ShardBuilder()).sample("000000002", "a truncated jpeg", image=jpeg_bytes(128, 128)[:300])
    builder.sample("000000003", "not an image", image=b"not an image at all" * 10).write(pool)


@case("unsupported_image_formats", accepted=1, reasons={Reason.UNSUPPORTED_IMAGE_FORMAT: 2})
def _unsupported(pool: Path) -> None:
    """a GIF and a BMP named .jpg"""
    builder = _good(ShardBuilder()).sample("000000002", "a gif", image=_image("GIF"))
    builder.sample("000000003", "a bmp", image=_image("BMP")).write(pool)


@case("image_too_small", accepted=1, reasons={Reason.IMAGE_TOO_SMALL: 1})
def _too_small(pool: Path) -> None:
    """an 8 x 8 image (minimum side 16 in LIMITS)"""
    _good(ShardBuilder()).sample("000000002", "a tiny image", image=jpeg_bytes(8, 8)).write(pool)


@case("missing_image", accepted=1, reasons={Reason.MISSING_IMAGE: 1})
def _missing_image(pool: Path) -> None:
    """a caption and json without an image"""
    _good(ShardBuilder()).file("000000002.txt", b"caption without an image").row("000000002").write(pool)


@case("missing_captions", accepted=1, reasons={Reason.MISSING_CAPTION: 2})
def _missing_captions(pool: Path) -> None:
    """a whitespace-only caption and an image without a .txt"""
    builder = _good(ShardBuilder()).sample("000000002", "   \n\t")
    builder.file("000000003.jpg", jpeg_bytes()).row("000000003").write(pool)


@case("invalid_utf8_caption", accepted=1, reasons={Reason.INVALID_UTF8: 1})
def _invalid_utf8(pool: Path) -> None:
    """caption bytes that are not UTF-8"""
    _good(ShardBuilder()).sample("000000002", b"caption \xff\xfe not utf-8").write(pool)


@case("caption_too_long", accepted=1, reasons={Reason.CAPTION_TOO_LONG: 1})
def _caption_too_long(pool: Path) -> None:
    """a 3,000-character caption (limit 2,048)"""
    _good(ShardBuilder()).sample("000000002", "word " * 600).write(pool)


# --- everything at once --------------------------------------------------------------------------------------


@case("kitchen_sink", accepted=3, reasons={
    Reason.UNSAFE_MEMBER_PATH: 2, Reason.UNSAFE_MEMBER_TYPE: 4, Reason.DECOMPRESSION_BOMB: 1,
    Reason.UNDECODABLE_IMAGE: 1, Reason.INVALID_UTF8: 1, Reason.MISSING_MEMBER: 1, Reason.NOT_DOWNLOADED: 1,
    Reason.DUPLICATE_UID: 1, Reason.MISSING_PARQUET_ROW: 1, Reason.OVERSIZE_MEMBER: 1, Reason.IMAGE_TOO_SMALL: 1,
    Reason.MISSING_CAPTION: 1, Reason.INVALID_UID: 1, Reason.INVALID_JSON: 1, Reason.MALFORMED_MEMBER_NAME: 1,
    Reason.MISSING_IMAGE: 1, Reason.DUPLICATE_KEY: 1})
def _kitchen_sink(pool: Path) -> None:
    """the crafted hostile shard of tests/helpers/shards.py: every defect in one shard, three good samples"""
    hostile_shard(pool)

