"""Near duplicates: SemDeDup on the teacher's image embeddings.

Definition: two samples are near duplicates when the cosine of their L2-normalised image
embeddings is at least ``1 - eps`` (``eps`` defaults to :data:`DEFAULT_EPS`, 0.05; a tolerance of
:data:`FLOAT_TOLERANCE` absorbs float32 rounding, so identical images, cosine 1, are always
near duplicates, even at ``eps=0``). Near-duplicate *groups* are the connected components of that
relation, so two members of a group may be further apart than ``1 - eps`` through a chain.

:func:`semdedup` follows SemDeDup (Abbas et al., 2023), one streaming pass plus local spill:

1. The batches are L2-normalised and spilled to a local float32 file (memory stays bounded by one
   batch; the uids are kept, the output needs them anyway).
2. Spherical k-means (torch, CUDA when present): centroids fitted on a seeded uniform sample of at
   most ``sample_size`` rows, then every row assigned to its nearest centroid in chunks.
3. Cluster by cluster, all pairwise cosines in ``chunk_rows x chunk_rows`` float32 blocks (never an
   n x n matrix, not even per cluster); each candidate pair is then decided (and its similarity
   reported) on a float64 dot product, so the result does not depend on ``chunk_rows``; the pairs
   above the threshold are joined with union-find.

Pairs split across two clusters are missed: that is SemDeDup's trade (``clusters=1`` is exact,
brute-force search in bounded memory). The result is deterministic for a seed and the same input
order (on one kind of device: CPU and CUDA may round a cosine at the threshold differently).
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterable, Iterator, Sequence

import numpy as np
import polars as pl

from curation_platform import lance_tables
from curation_platform.embedding.sinks import EMBEDDINGS_TABLE, vectors
from curation_platform.storage import S3Settings

DEFAULT_EPS = 0.05
FLOAT_TOLERANCE = 1e-6
_CANDIDATE_MARGIN = 1e-4  # float32 block cosines pick candidates; a float64 dot per pair decides
NEAR_GROUPS_SCHEMA = {"group_id": pl.String, "uid": pl.String, "kind": pl.String, "similarity": pl.Float64}

Batch = tuple[Sequence[str], np.ndarray]


def read_image_embeddings(lance_uri: str, teacher_id: str, s3: S3Settings | None = None,
                          batch_rows: int = 65536) -> Iterator[tuple[list[str], np.ndarray]]:
    """Stream ``(uids, float32 [n, d] image embeddings)`` of one teacher from the embeddings table."""
    dataset = lance_tables.connect(lance_uri, s3).open_table(EMBEDDINGS_TABLE).to_lance()
    batches = dataset.to_batches(columns=["uid", "image_embedding"], batch_size=batch_rows,
                                 filter=f"teacher_id = {lance_tables.sql_string(teacher_id)}")
    import pyarrow as pa

    for batch in batches:
        if batch.num_rows:
            table = pa.Table.from_batches([batch])
            yield [str(uid) for uid in table.column("uid").to_pylist()], vectors(table, "image_embedding")


def _device(device: str | None) -> str:
    import torch

    if device is not None:
        return device
    return "cuda" if torch.cuda.is_available() else "cpu"


def unit_rows(rows: np.ndarray) -> np.ndarray:
    rows = np.asarray(rows, dtype=np.float32)
    norms = np.linalg.norm(rows, axis=1, keepdims=True)
    return rows / np.maximum(norms, 1e-12)


def _spherical_kmeans(sample: np.ndarray, clusters: int, seed: int, device: str, iterations: int) -> np.ndarray:
    """Unit-norm centroids (clusters x d) fitted on unit-norm ``sample`` rows; seeded init from distinct rows."""
    import torch

    rng = np.random.default_rng(seed)
    points = torch.from_numpy(np.ascontiguousarray(sample)).to(device)
    init = np.sort(rng.choice(len(sample), size=clusters, replace=False))
    centroids = points[torch.from_numpy(init).to(device)].clone()
    for _ in range(iterations):
        assign = (points @ centroids.T).argmax(dim=1)
        sums = torch.zeros_like(centroids).index_add_(0, assign, points)
        counts = torch.bincount(assign, minlength=clusters)
        empty = torch.nonzero(counts == 0).flatten()
        if len(empty):  # re-seed an empty cluster on the points worst served by their centroid
            worst = (points * centroids[assign]).sum(dim=1).argsort()[: len(empty)]
            sums[empty] = points[worst]
        updated = sums / sums.norm(dim=1, keepdim=True).clamp_min(1e-12)
        if torch.equal(updated, centroids):
            break
        centroids = updated
    return centroids.cpu().numpy()


class UnionFind:
    """Union-find over 0..size-1 whose root is always the smallest member (so group ids are stable)."""

    def __init__(self, size: int) -> None:
        self.parent = np.arange(size)

    def find(self, item: int) -> int:
        parent = self.parent
        root = item
        while parent[root] != root:
            root = parent[root]
        while parent[item] != root:
            parent[item], item = root, parent[item]
        return int(root)

    def union(self, left: int, right: int) -> None:
        a, b = self.find(left), self.find(right)
        if a != b:
            self.parent[max(a, b)] = min(a, b)


def semdedup(embeddings: Iterable[Batch], *, clusters: int, eps: float = DEFAULT_EPS, seed: int = 0,
             sample_size: int = 100_000, chunk_rows: int = 4096, kmeans_iterations: int = 50,
             device: str | None = None, spill_dir: str | None = None) -> pl.DataFrame:
    """Near-duplicate groups (see the module docstring) of the streamed ``(uids, [n, d] vectors)`` batches.

    ``clusters`` k-means clusters (capped at the number of rows; 1 means exact search), fitted on a
    seeded sample of at most ``sample_size`` rows; pairwise cosines are computed in blocks of at
    most ``chunk_rows`` x ``chunk_rows``. Returns columns ``group_id`` (the smallest uid of the
    group, so stable), ``uid``, ``kind`` (``"near"``) and ``similarity``: the highest cosine
    between this sample and another member of its group among the pairs that joined the group.
    Only groups of two or more; sorted by (group_id, uid). A uid repeated in the input is an error.
    """
    import torch

    if clusters < 1:
        raise ValueError(f"clusters must be >= 1, got {clusters}")
    if not 0 <= eps < 2:
        raise ValueError(f"eps must be in [0, 2), got {eps}")
    if sample_size < 1 or chunk_rows < 1:
        raise ValueError("sample_size and chunk_rows must be >= 1")
    device = _device(device)
    threshold = 1.0 - eps - FLOAT_TOLERANCE
    uids: list[str] = []
    dim: int | None = None
    with tempfile.TemporaryDirectory(prefix="semdedup-", dir=spill_dir) as folder:
        path = os.path.join(folder, "vectors.f32")
        with open(path, "wb") as spill:
            for batch_uids, rows in embeddings:
                rows = np.asarray(rows)
                if rows.ndim != 2 or rows.shape[0] != len(batch_uids):
                    raise ValueError(f"a batch of {len(batch_uids)} uids came with vectors of shape {rows.shape}")
                if dim is None:
                    dim = rows.shape[1]
                elif rows.shape[1] != dim:
                    raise ValueError(f"vectors of dimension {rows.shape[1]} after {dim}")
                spill.write(unit_rows(rows).tobytes())
                uids.extend(str(uid) for uid in batch_uids)
        total = len(uids)
        if len(set(uids)) != total:
            raise ValueError("the embeddings repeat a uid")
        if total < 2 or dim is None:
            return pl.DataFrame(schema=NEAR_GROUPS_SCHEMA)
        stored = np.memmap(path, dtype=np.float32, mode="r", shape=(total, dim))
        clusters = min(clusters, total)

        # 2. centroids on a seeded sample, then every row assigned in chunks
        if clusters == 1:
            assign = np.zeros(total, dtype=np.int64)
        else:
            rng = np.random.default_rng(seed)
            picked = np.sort(rng.choice(total, size=min(sample_size, total), replace=False))
            centroids = _spherical_kmeans(np.asarray(stored[picked]), clusters, seed, device, kmeans_iterations)
            on_device = torch.from_numpy(centroids).to(device)
            assign = np.empty(total, dtype=np.int64)
            step = max(chunk_rows, 1024)
            for start in range(0, total, step):
                block = torch.from_numpy(np.array(stored[start:start + step])).to(device)
                assign[start:start + step] = (block @ on_device.T).argmax(dim=1).cpu().numpy()

        # 3. within each cluster, blockwise pairwise cosines -> union-find
        union = UnionFind(total)
        best = np.full(total, -np.inf)
        order = np.argsort(assign, kind="stable")
        bounds = np.searchsorted(assign[order], np.arange(clusters + 1))
        for cluster in range(clusters):
            members = order[bounds[cluster]:bounds[cluster + 1]]
            if len(members) < 2:
                continue
            rows = torch.from_numpy(np.asarray(stored[members])).to(device)
            for left in range(0, len(members), chunk_rows):
                for right in range(left, len(members), chunk_rows):
                    sims = rows[left:left + chunk_rows] @ rows[right:right + chunk_rows].T
                    hits = sims >= threshold - _CANDIDATE_MARGIN
                    if left == right:
                        hits = torch.triu(hits, diagonal=1)
                    pairs = torch.nonzero(hits)
                    if not len(pairs):
                        continue
                    # decide on a float64 dot of each candidate pair: the same whatever the block shape
                    one, two = pairs[:, 0] + left, pairs[:, 1] + right
                    values = (rows[one].double() * rows[two].double()).sum(dim=1)
                    keep = values >= threshold
                    values = values[keep].cpu().numpy()
                    first, second = members[one[keep].cpu().numpy()], members[two[keep].cpu().numpy()]
                    np.maximum.at(best, first, values)
                    np.maximum.at(best, second, values)
                    for a, b in zip(first.tolist(), second.tolist(), strict=True):
                        union.union(a, b)
        del stored

    joined = np.flatnonzero(np.isfinite(best))
    if not len(joined):
        return pl.DataFrame(schema=NEAR_GROUPS_SCHEMA)
    frame = pl.DataFrame(
        {
            "root": [union.find(int(i)) for i in joined],
            "uid": [uids[i] for i in joined],
            "similarity": np.minimum(best[joined], 1.0),
        },
        schema={"root": pl.Int64, "uid": pl.String, "similarity": pl.Float64},
    )
    return (
        frame.with_columns(pl.col("uid").min().over("root").alias("group_id"))
        .select("group_id", "uid", pl.lit("near", dtype=pl.String).alias("kind"), "similarity")
        .sort("group_id", "uid")
    )
