"""Figures of the duplicate groups for the UI and reports: group sizes, and the largest groups' images."""

from __future__ import annotations

import io

import numpy as np
import polars as pl
import pyarrow.dataset as ds

from curation_platform import storage
from curation_platform.analysis import panel_grid
from curation_platform.layout import ShardOutputs
from curation_platform.pool import shard_file_uri
from curation_platform.storage import S3Settings

GRID_COLUMNS = 8
MAX_SIZE_BIN = 10  # groups of this many members or more share the last bar


def _png(figure) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100, metadata={"Software": None})
    return buffer.getvalue()


def group_size_histogram(groups: pl.DataFrame) -> bytes:
    """Bars of how many groups of each kind have 2, 3, ..., ``MAX_SIZE_BIN``+ members (PNG)."""
    from matplotlib import style

    sizes = (groups.group_by("kind", "group_id").len()
             .with_columns(size=pl.col("len").clip(upper_bound=MAX_SIZE_BIN)))
    kinds = sorted(sizes["kind"].unique().to_list()) or ["none"]
    with style.context("default"):
        figure, axes = panel_grid(len(kinds), columns=3, size=(3.6, 2.6))
        bins = np.arange(2, MAX_SIZE_BIN + 1)
        for axis, kind in zip(axes, kinds):
            counts = sizes.filter(pl.col("kind") == kind).group_by("size").len()
            by_size = dict(counts.iter_rows())
            axis.bar(bins, [by_size.get(int(size), 0) for size in bins], color="tab:blue")
            axis.set_xticks(bins, [str(b) if b < MAX_SIZE_BIN else f"{b}+" for b in bins], fontsize=7)
            axis.set(title=f"{kind} groups", xlabel="members", ylabel="groups")
        return _png(figure)


def sample_images(validated_uri: str, pool_uri: str, uids: list[str], s3: S3Settings | None = None
                  ) -> tuple[dict[str, bytes], dict[str, str]]:
    """Encoded images and captions of a few pool samples, read at their recorded tar offsets."""
    if not uids:
        return {}, {}
    filesystem, local = storage.filesystem_for(ShardOutputs.samples_root(validated_uri), s3)
    rows = ds.dataset(local, filesystem=filesystem, format="parquet").to_table(
        columns=["uid", "shard", "caption", "image_offset", "image_bytes"], filter=ds.field("uid").isin(uids))
    images, captions = {}, {}
    for row in rows.to_pylist():
        captions[row["uid"]] = row["caption"]
        try:
            tar_system, tar_path = storage.filesystem_for(shard_file_uri(pool_uri, row["shard"]), s3)
            with tar_system.open_input_file(tar_path) as tar:
                images[row["uid"]] = tar.read_at(row["image_bytes"], row["image_offset"])
        except OSError:
            continue  # a placeholder is drawn
    return images, captions


def largest_groups_grid(groups: pl.DataFrame, images: dict[str, bytes], captions: dict[str, str],
                        rows: int = 6) -> bytes:
    """The ``rows`` largest groups (ties by kind, group id), one per grid row, members by uid (PNG)."""
    from matplotlib import style

    from curation_platform.releases.report import THUMB, _caption, _thumbnail

    chosen = largest_groups(groups, rows)
    with style.context("default"):
        figure, axes = panel_grid(max(1, chosen.height) * GRID_COLUMNS, columns=GRID_COLUMNS, size=(1.55, 2.3))
        for index, (kind, group_id) in enumerate(chosen.select("kind", "group_id").iter_rows()):
            members = groups.filter(pl.col("kind") == kind, pl.col("group_id") == group_id).sort("uid")
            cells = axes[index * GRID_COLUMNS:(index + 1) * GRID_COLUMNS]
            for axis, member in zip(cells, members.head(GRID_COLUMNS).iter_rows(named=True)):
                thumbnail = _thumbnail(images.get(member["uid"]))
                axis.imshow(thumbnail if thumbnail is not None else np.full((THUMB, THUMB, 3), 225, np.uint8))
                axis.set_xticks([])
                axis.set_yticks([])
                axis.set_title(f"{kind} {member['similarity']:.3f}", fontsize=7, parse_math=False)
                axis.set_xlabel(_caption(captions.get(member["uid"])), fontsize=6.5, parse_math=False)
            for axis in cells[members.height:]:
                axis.set_axis_off()
        if chosen.is_empty():
            axes[0].set_axis_off()
            axes[0].text(0.5, 0.5, "no duplicate groups", ha="center", va="center")
        return _png(figure)


def largest_groups(groups: pl.DataFrame, count: int) -> pl.DataFrame:
    """``(kind, group_id, members)`` of the ``count`` largest groups."""
    return (groups.group_by("kind", "group_id").agg(pl.len().alias("members"))
            .sort("members", "kind", "group_id", descending=[True, False, False]).head(count))
