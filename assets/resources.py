"""Resources: where the pool and the project's outputs live, configured from the environment."""

from __future__ import annotations

import os
from pathlib import Path

import dagster as dg

from curation_platform import storage
from curation_platform.pool import ChecksumCache, ShardRef, discover_shards
from curation_platform.storage import S3Settings
from curation_platform.embedding.engine import EmbedConfig
from curation_platform.teachers import TeacherSpec
from curation_platform.validation import ValidationLimits


class PlatformResource(dg.ConfigurableResource):
    """The pool to curate and the project home; the embedded default is local folders.

    ``pool_uri`` defaults to the demo pool that ``curation-platform demo`` writes under the home.
    S3 settings come from the standard ``AWS_*`` environment variables, never from config.
    """

    home_uri: str | None = None
    pool_uri: str | None = None
    decode_workers: int = 2
    min_image_side: int = ValidationLimits.min_image_side
    max_pixels: int = ValidationLimits.max_pixels
    max_caption_chars: int = ValidationLimits.max_caption_chars

    @property
    def home(self) -> str:
        """``home_uri``, else ``$CURATION_HOME``, else ``./curation_home`` (as the CLI resolves it)."""
        return self.home_uri or str(Path(os.environ.get("CURATION_HOME", "curation_home")).resolve())

    @property
    def pool(self) -> str:
        return self.pool_uri or storage.join(self.home, "demo", "pool")

    @property
    def validated_uri(self) -> str:
        return storage.join(self.home, "validated")

    @property
    def lancedb_uri(self) -> str:
        return storage.join(self.home, "lancedb")

    @property
    def reference_uri(self) -> str:
        """The trusted split a self-trained teacher learns from (the demo's clean reference split)."""
        return storage.join(self.home, "demo", "reference")

    @property
    def trained_teacher_uri(self) -> str:
        return storage.join(self.home, "teacher")

    @property
    def s3(self) -> S3Settings:
        return S3Settings.from_env()

    @property
    def limits(self) -> ValidationLimits:
        return ValidationLimits(
            min_image_side=self.min_image_side, max_pixels=self.max_pixels, max_caption_chars=self.max_caption_chars
        )

    def discover(self) -> list[ShardRef]:
        if not storage.exists(self.pool, self.s3):
            return []
        return discover_shards(self.pool, s3=self.s3, checksum_cache=self._checksum_cache())

    def _checksum_cache(self) -> ChecksumCache | None:
        return None if storage.is_s3(self.home) else ChecksumCache(Path(self.home, "state", "checksums.sqlite"))

    def shard(self, partition_key: str) -> ShardRef:
        """The shard behind a partition: addressed directly, scanning the pool only for odd names."""
        for suffix in (".tar", ".parquet"):
            uri = storage.join(self.pool, partition_key + suffix)
            if storage.exists(uri, self.s3):
                return discover_shards(uri, s3=self.s3, checksum_cache=self._checksum_cache())[0]
        for shard in self.discover():
            if shard.partition_key == partition_key:
                return shard
        raise dg.Failure(f"shard {partition_key!r} is no longer in the pool {self.pool}")


class TeacherResource(dg.ConfigurableResource):
    """Which teacher embeds the pool: a checkpoint/teacher directory, or an open_clip tag.

    With nothing set, the platform trains its own teacher (the ``teacher`` asset) and uses it.
    """

    checkpoint: str | None = None
    architecture: str | None = None
    pretrained: str | None = None
    device: str = "auto"
    batch_size: int = 256
    workers: int = 2
    table: str = "embeddings"

    @property
    def trains_its_own(self) -> bool:
        return not (self.checkpoint or self.pretrained)

    def spec(self, platform: PlatformResource) -> TeacherSpec:
        if self.trains_its_own:
            return TeacherSpec(checkpoint=platform.trained_teacher_uri)
        return TeacherSpec(architecture=self.architecture, pretrained=self.pretrained, checkpoint=self.checkpoint)

    def embed_config(self) -> EmbedConfig:
        return EmbedConfig(device=self.device, batch_size=self.batch_size, workers=self.workers)
