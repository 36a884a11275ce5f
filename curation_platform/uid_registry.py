"""Which shards hold an accepted uid, so that a sample present in two shards is kept exactly once.

Ingestion records every uid a shard accepts (one partition per shard, replaced when the shard is
re-ingested) and then looks those uids up among the other shards' records. A uid belongs to the
holder whose shard name sorts first; every other holder quarantines its copy as
``cross_shard_duplicate``. The rule depends on names only, never on which shard was ingested first,
so a re-run over the pool gives the same result whatever the order or concurrency. Because each
shard records before it looks up, of two shards ingested at once at least one sees the other: a
shard that kept a uid before its owner was recorded is named by the owner's lookup
(:attr:`Claim.displaced`), and re-ingesting that shard settles it.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Collection, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import pyarrow as pa

from curation_platform import lance_tables
from curation_platform.storage import S3Settings

REGISTRY_TABLE = "uid_holders"
PRIMARY_KEY = ("holder_key",)
LOOKUP_CHUNK = 4096
INDEX_FROM_ROWS = 100_000  # below this a lookup scans the table faster than it maintains a BTREE

SCHEMA = pa.schema([
    pa.field("holder_key", pa.string(), nullable=False),
    pa.field("uid", pa.string(), nullable=False),
    pa.field("shard", pa.string(), nullable=False),
    pa.field("kept", pa.bool_(), nullable=False),  # False: the shard quarantined its copy
])


@dataclass(frozen=True)
class Claim:
    """What a shard's lookup found: uids owned by an earlier-named shard, and later-named shards
    that hold uids this shard owns (their copies were accepted before this shard was recorded)."""

    owners: dict[str, str] = field(default_factory=dict)  # uid -> owning shard (not this one)
    displaced: dict[str, int] = field(default_factory=dict)  # later shard -> this shard's uids it kept


class UidRegistry(Protocol):
    def record(self, shard: str, uids: Sequence[str], quarantined: Collection[str] = ()) -> None:
        """Make ``uids`` the shard's holdings (replacing its earlier record); ``quarantined`` are not kept."""
        ...

    def holders(self, shard: str, uids: Sequence[str]) -> dict[str, dict[str, bool]]:
        """uid -> {other shard: whether it kept its copy}; uids nobody else holds are absent."""
        ...


def claim(registry: UidRegistry, shard: str, uids: Sequence[str]) -> Claim:
    """Record ``shard``'s accepted uids, then decide which of them belong to another shard."""
    registry.record(shard, uids)
    owners: dict[str, str] = {}
    displaced: dict[str, int] = defaultdict(int)
    for uid, others in registry.holders(shard, uids).items():
        first = min(others)
        if first < shard:
            owners[uid] = first
            continue
        for other, kept in others.items():
            if kept:
                displaced[other] += 1
    if owners:
        registry.record(shard, uids, quarantined=owners.keys())
    return Claim(owners=owners, displaced=dict(sorted(displaced.items())))


class MemoryUidRegistry:
    """In-process registry: ``validate`` (which writes nothing) and tests."""

    def __init__(self) -> None:
        self._by_shard: dict[str, dict[str, bool]] = {}

    def record(self, shard: str, uids: Sequence[str], quarantined: Collection[str] = ()) -> None:
        self._by_shard[shard] = {uid: uid not in quarantined for uid in uids}

    def holders(self, shard: str, uids: Sequence[str]) -> dict[str, dict[str, bool]]:
        found: dict[str, dict[str, bool]] = defaultdict(dict)
        for other, held in self._by_shard.items():
            if other != shard:
                for uid in set(uids) & held.keys():
                    found[uid][other] = held[uid]
        return dict(found)


class LanceUidRegistry:
    """The registry as a LanceDB table next to the validated samples (local path or ``s3://``).

    One writer per shard partition (``replace_partition``), so concurrent shards never conflict on
    keys; a BTREE index on ``uid`` keeps lookups sub-linear once the pool is large.
    """

    def __init__(self, uri: str, s3: S3Settings | None = None) -> None:
        self.uri, self.s3 = uri, s3

    def _table(self) -> Any:
        return lance_tables.open_or_create(lance_tables.connect(self.uri, self.s3), REGISTRY_TABLE, SCHEMA,
                                           PRIMARY_KEY)

    def record(self, shard: str, uids: Sequence[str], quarantined: Collection[str] = ()) -> None:
        rows = pa.table({"holder_key": [f"{uid}@{shard}" for uid in uids], "uid": list(uids),
                         "shard": [shard] * len(uids), "kept": [uid not in quarantined for uid in uids]},
                        schema=SCHEMA)
        lance_tables.replace_partition(self._table, PRIMARY_KEY, f"shard = {lance_tables.sql_string(shard)}",
                                       lambda: pa.RecordBatchReader.from_batches(SCHEMA, rows.to_batches()))
        self._ensure_index()

    def holders(self, shard: str, uids: Sequence[str]) -> dict[str, dict[str, bool]]:
        dataset = self._table().to_lance()
        found: dict[str, dict[str, bool]] = defaultdict(dict)
        for chunk in _chunks(list(uids), LOOKUP_CHUNK):
            condition = (f"uid IN ({', '.join(map(lance_tables.sql_string, chunk))}) "
                         f"AND shard != {lance_tables.sql_string(shard)}")
            for row in dataset.to_table(columns=["uid", "shard", "kept"], filter=condition).to_pylist():
                found[row["uid"]][row["shard"]] = row["kept"]
        return dict(found)

    def _ensure_index(self) -> None:
        table = self._table()
        if any(index.columns == ["uid"] for index in table.list_indices()):
            return
        if table.count_rows() >= INDEX_FROM_ROWS:
            table.create_scalar_index("uid", index_type="BTREE")


def _chunks(items: list[str], size: int) -> Iterator[list[str]]:
    for start in range(0, len(items), size):
        yield items[start:start + size]
