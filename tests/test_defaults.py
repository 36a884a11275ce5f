"""One source of defaults: every Dagster resource field and CLI option that mirrors a library dataclass
field has that field's default (the dataclasses are the source; this fails when a copy drifts)."""

from __future__ import annotations

import dataclasses

import click
import pytest

from curation_platform.embedding.engine import EmbedConfig
from curation_platform.scoring.pipeline import ScoreParams
from curation_platform.teacher_quality import TeacherBar
from curation_platform.training import TrainingConfig
from curation_platform.validation import ValidationLimits
from curation_platform_dagster.cli import main
from curation_platform_dagster.defs.resources import PlatformResource, ScoringResource, TeacherResource


def _defaults(dataclass_type: type) -> dict:
    return {field.name: field.default for field in dataclasses.fields(dataclass_type)
            if field.default is not dataclasses.MISSING}


# (resource, dataclass, {resource field: dataclass field})
RESOURCE_MIRRORS = [
    (ScoringResource, ScoreParams, {name: name for name in ("reference_size", "reference_seed", "neg_clip_batch_size",
                                                           "neg_clip_repeats", "neg_clip_seed", "importance_scale")}),
    (TeacherResource, EmbedConfig, {"device": "device", "batch_size": "batch_size", "workers": "workers"}),
    (TeacherResource, TrainingConfig, {"epochs": "epochs", "precision": "precision", "threads": "threads",
                                       "max_training_seconds": "max_seconds"}),
    (TeacherResource, TeacherBar, {"min_recall_at_5": "min_recall_at_5", "min_chance_multiple": "min_chance_multiple"}),
    (PlatformResource, ValidationLimits, {name: name for name in ("min_image_side", "max_pixels", "max_caption_chars")}),
]

# (command path, dataclass, {option name: dataclass field})
CLI_MIRRORS = [
    (["embed"], EmbedConfig, {"device": "device", "batch_size": "batch_size", "workers": "workers"}),
    (["score"], ScoreParams, {"reference_size": "reference_size", "reference_seed": "reference_seed",
                              "neg_clip_batch_size": "neg_clip_batch_size", "repeats": "neg_clip_repeats"}),
    (["train-teacher"], TrainingConfig, {"precision": "precision", "training_seed": "seed"}),
    (["run"], TrainingConfig, {"precision": "precision"}),
    (["validate"], ValidationLimits, {"min_side": "min_image_side", "max_pixels": "max_pixels",
                                      "max_caption_chars": "max_caption_chars"}),
    (["ingest"], ValidationLimits, {"min_side": "min_image_side", "max_pixels": "max_pixels",
                                    "max_caption_chars": "max_caption_chars"}),
]


@pytest.mark.parametrize("resource, source, fields", RESOURCE_MIRRORS,
                         ids=[f"{resource.__name__}-{source.__name__}" for resource, source, _ in RESOURCE_MIRRORS])
def test_resource_defaults_are_the_dataclass_defaults(resource, source, fields: dict[str, str]) -> None:
    expected = _defaults(source)
    for resource_field, source_field in fields.items():
        assert resource.model_fields[resource_field].default == expected[source_field], (resource_field, source_field)


@pytest.mark.parametrize("path, source, options", CLI_MIRRORS,
                         ids=[f"{' '.join(path)}-{source.__name__}" for path, source, _ in CLI_MIRRORS])
def test_cli_defaults_are_the_dataclass_defaults(path: list[str], source, options: dict[str, str]) -> None:
    command: click.Command = main
    for name in path:
        command = command.commands[name]
    defaults = {param.name: param.default for param in command.params}
    expected = _defaults(source)
    for option, field in options.items():
        assert defaults[option] == expected[field], (path, option, field)
