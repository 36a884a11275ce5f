"""Quarantine reason codes: why a sample mentioned by a shard was not accepted.

Codes are stable strings (they land in parquet files, reports and Dagster checks); add new
ones, never rename. Each sample gets exactly one code: the first failing check in the order
the validator runs them (shard structure, identity, content, then the pool-wide uid check).
"""

from __future__ import annotations

from enum import StrEnum


class Reason(StrEnum):
    # Shard structure: the tar and the parquet disagree, or a member is hostile.
    NOT_DOWNLOADED = "not_downloaded"
    MISSING_MEMBER = "missing_member"
    MISSING_PARQUET_ROW = "missing_parquet_row"
    MISSING_IMAGE = "missing_image"
    UNSAFE_MEMBER_PATH = "unsafe_member_path"
    UNSAFE_MEMBER_TYPE = "unsafe_member_type"
    OVERSIZE_MEMBER = "oversize_member"
    DUPLICATE_MEMBER = "duplicate_member"
    MALFORMED_MEMBER_NAME = "malformed_member_name"
    TRUNCATED_SHARD = "truncated_shard"
    # Identity.
    DUPLICATE_KEY = "duplicate_key"
    MISSING_KEY = "missing_key"
    INVALID_UID = "invalid_uid"
    UID_CONFLICT = "uid_conflict"
    DUPLICATE_UID = "duplicate_uid"
    INVALID_JSON = "invalid_json"
    INVALID_METADATA = "invalid_metadata"
    # Content.
    DECOMPRESSION_BOMB = "decompression_bomb"
    IMAGE_TOO_LARGE = "image_too_large"
    UNSUPPORTED_IMAGE_FORMAT = "unsupported_image_format"
    UNDECODABLE_IMAGE = "undecodable_image"
    IMAGE_TOO_SMALL = "image_too_small"
    MISSING_CAPTION = "missing_caption"
    INVALID_UTF8 = "invalid_utf8"
    CAPTION_TOO_LONG = "caption_too_long"
    # Pool-wide, after every per-shard check.
    CROSS_SHARD_DUPLICATE = "cross_shard_duplicate"


REASON_DESCRIPTIONS: dict[Reason, str] = {
    Reason.NOT_DOWNLOADED: "parquet row whose status is not 'success' (img2dataset could not fetch it)",
    Reason.MISSING_MEMBER: "parquet row with status 'success' but no members in the tar",
    Reason.MISSING_PARQUET_ROW: "tar members whose key has no parquet row (or the parquet is unreadable)",
    Reason.MISSING_IMAGE: "sample without a .jpg/.jpeg/.png/.webp member",
    Reason.UNSAFE_MEMBER_PATH: "member name is absolute, climbs with '..', or holds control characters",
    Reason.UNSAFE_MEMBER_TYPE: "member is a link, device or fifo instead of a regular file",
    Reason.OVERSIZE_MEMBER: "member larger than the configured byte limit (not read)",
    Reason.DUPLICATE_MEMBER: "the same key has two members of one kind (e.g. two images)",
    Reason.MALFORMED_MEMBER_NAME: "member name has no KEY.EXT form",
    Reason.TRUNCATED_SHARD: "the tar ended or broke while this sample was being read",
    Reason.DUPLICATE_KEY: "a key seen earlier in the shard appears again",
    Reason.MISSING_KEY: "parquet row whose key is null or empty",
    Reason.INVALID_UID: "uid in json/parquet is not 32 hexadecimal digits",
    Reason.UID_CONFLICT: "json and parquet give different uids for the key",
    Reason.DUPLICATE_UID: "uid already taken by an earlier sample of the shard",
    Reason.INVALID_JSON: "KEY.json is not a JSON object",
    Reason.INVALID_METADATA: "a url, status or original size in the parquet/json of the wrong type or out of range",
    Reason.CROSS_SHARD_DUPLICATE: "uid also accepted by another shard; the shard whose name sorts first keeps it",
    Reason.DECOMPRESSION_BOMB: "declared pixel count above the limit (not decoded)",
    Reason.IMAGE_TOO_LARGE: "an image side above the safety limit (not decoded): resizing it would take gigabytes",
    Reason.UNSUPPORTED_IMAGE_FORMAT: "image decodes to a format outside the allowed set",
    Reason.UNDECODABLE_IMAGE: "image bytes do not decode (corrupt or truncated)",
    Reason.IMAGE_TOO_SMALL: "shorter image side below the minimum",
    Reason.MISSING_CAPTION: "no .txt member, or the caption is empty after stripping",
    Reason.INVALID_UTF8: "caption bytes are not valid UTF-8",
    Reason.CAPTION_TOO_LONG: "caption longer than the character limit",
}
