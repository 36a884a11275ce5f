"""Release recipes: a declarative TOML (or YAML) file that chains the selection policies.

    name = "negclip-normsim"
    description = "negCLIPLoss top 30% of the pool, then NormSim_inf to 20% of the pool"
    min_size = 100

    [[stage]]
    type = "basic_filter"

    [[stage]]
    type = "top_fraction"
    score = "neg_clip_loss"
    fraction = 0.30

    [[stage]]
    type = "top_fraction"
    score = "norm_sim_inf"
    fraction = 0.20

    [weights]                      # optional: importance weights of a domain prompt
    prompt = "a photo of a geometric shape"
    mode = "self_normalised"       # raw | self_normalised | clipped (clip_at = 10)

Stage types: ``threshold`` (score, min, max), ``top_fraction`` (score, fraction, of = "pool" |
"current", descending), ``datacomp_top_fraction`` (the same fields; DataComp's threshold rule, which
keeps ``int(fraction * N) + 1`` rows plus ties: docs/baselines.md), ``rank_sum`` (scores, fraction, weights, of), ``is_in`` (column, values),
``intersection`` (stages = [...]), ``norm_sim_d`` (fraction, num_iters, sample_fraction, seed),
``dedup`` (keep = the score that picks each duplicate group's representative, kinds = ["image",
"caption", "near"], descending), ``decontaminate`` (sets = evaluation-set names; all when absent), and
the DataComp baseline ``basic_filter`` (on the original image sizes). ``max_size`` keeps the best ``max_size`` rows by
``rank_by`` after the stages; fewer than ``min_size`` rows refuse the release.
"""

from __future__ import annotations

import hashlib
import math
import re
import tomllib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from curation_platform.scoring.pipeline import SCORE_COLUMNS, prompt_column
from curation_platform.scoring.scores import WEIGHT_MODES, WeightMode
from curation_platform.selection import (
    DEDUP_KINDS,
    DataCompTopFraction,
    Decontaminate,
    Dedup,
    EmbeddingSource,
    Intersection,
    IsIn,
    NormSimD,
    Policy,
    RankSum,
    Threshold,
    TopFraction,
    basic_filter,
)

# the sample attributes a recipe may name besides the scores (basic_filter reads all of them)
RECIPE_SAMPLE_COLUMNS = ("language", "caption_words", "caption_chars", "width", "height", "aspect_ratio",
                         "original_width", "original_height")
TARGET_SCORES = ("norm_sim_2", "norm_sim_inf")
NAME_PATTERN = re.compile(r"^[a-z0-9][a-z0-9_-]{0,63}$")
STAGE_KEYS = {
    "threshold": {"score", "min", "max"},
    "top_fraction": {"score", "fraction", "of", "descending"},
    "datacomp_top_fraction": {"score", "fraction", "of", "descending"},
    "rank_sum": {"scores", "fraction", "weights", "of", "descending"},
    "is_in": {"column", "values"},
    "intersection": {"stages"},
    "norm_sim_d": {"fraction", "num_iters", "sample_fraction", "seed", "of"},
    "basic_filter": set(),
    "dedup": {"keep", "kinds", "descending"},
    "decontaminate": {"sets"},
}
DUPLICATE_STAGES = ("dedup", "decontaminate")


class RecipeError(ValueError):
    """A recipe that cannot run; the message says where and why."""


@dataclass(frozen=True)
class WeightSpec:
    prompt: str
    mode: WeightMode = "self_normalised"
    clip_at: float = 10.0

    @property
    def column(self) -> str:
        return prompt_column(self.prompt)


@dataclass(frozen=True)
class Recipe:
    """A parsed, validated recipe; ``text`` is the file verbatim (hashed into the release id)."""

    name: str
    text: str
    stages: tuple[dict[str, Any], ...]
    description: str = ""
    weights: WeightSpec | None = None
    min_size: int = 1
    max_size: int | None = None
    rank_by: str | None = None

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.text.encode()).hexdigest()

    def scores_used(self) -> list[str]:
        """Score and metadata columns the recipe reads, in first-use order."""
        used: list[str] = []
        for stage in _walk(self.stages):
            for name in _columns_of(stage):
                if name not in used:
                    used.append(name)
        for name in ([self.rank_by] if self.rank_by else []) + ([self.weights.column] if self.weights else []):
            if name not in used:
                used.append(name)
        return used

    def needs_duplicates(self) -> bool:
        """Whether a stage reads the duplicate groups or the contamination flags."""
        return any(stage["type"] in DUPLICATE_STAGES for stage in _walk(self.stages))

    def needs_target(self) -> bool:
        return any(name in TARGET_SCORES for name in self.scores_used())

    def policies(self, embeddings: EmbeddingSource | None = None) -> list[Policy]:
        """The selection policies; ``embeddings`` feeds NormSim-D stages (uids -> image embeddings)."""
        return [_policy(stage, embeddings) for stage in self.stages]

    def check_columns(self, available: Sequence[str], prompts: Sequence[str] = ()) -> None:
        """Refuse a recipe that names a column the score table does not have."""
        missing = [name for name in self.scores_used() if name not in available]
        if missing:
            hint = f"; scored prompts: {list(prompts)}" if any(n.startswith("iw_") for n in missing) else ""
            raise RecipeError(f"recipe {self.name!r} uses {missing}, not in the score table{hint}")


# Bounds on what a recipe file may be: it is reviewed like code, so these are far above any real one.
MAX_RECIPE_BYTES = 256 * 1024
MAX_STAGES = 64
MAX_NESTING = 16  # tables/lists inside each other (an intersection of intersections ...)
MAX_LIST_ITEMS = 10_000  # e.g. is_in values


class _NoAliasLoader(yaml.SafeLoader):
    """PyYAML's safe loader without anchors and aliases: a recipe never needs them, and nested aliases
    (billion laughs) expand exponentially."""

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise yaml.composer.ComposerError(None, None, "aliases (*name) are not allowed in a recipe",
                                              event.start_mark)
        node = super().compose_node(parent, index)
        if getattr(node, "anchor", None):
            raise yaml.composer.ComposerError(None, None, "anchors (&name) are not allowed in a recipe",
                                              node.start_mark)
        return node


def load_recipe(path: str | Path) -> Recipe:
    path = Path(path)
    size = path.stat().st_size
    if size > MAX_RECIPE_BYTES:
        raise RecipeError(f"{path}: {size:,} bytes; a recipe is at most {MAX_RECIPE_BYTES:,}")
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as error:
        raise RecipeError(f"{path}: not UTF-8 text ({error.reason} at byte {error.start})") from error
    return parse_recipe(text, yaml_syntax=path.suffix.lower() in (".yaml", ".yml"), source=str(path))


def _depth(value: Any, limit: int) -> int:
    """Nesting depth of tables and lists, counted iteratively (no recursion), stopping past ``limit``."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict | list):
            deepest = max(deepest, depth)
            if deepest > limit:
                return deepest
            children = item.values() if isinstance(item, dict) else item
            stack.extend((child, depth + 1) for child in children)
    return deepest


def parse_recipe(text: str, yaml_syntax: bool = False, source: str = "recipe") -> Recipe:
    """Parse and validate; every error names the offending stage and field.

    Files are bounded (:data:`MAX_RECIPE_BYTES`, :data:`MAX_STAGES`, :data:`MAX_NESTING`), YAML is read
    without anchors and aliases, and every field is type- and range-checked before any data is read.
    """
    if len(text.encode("utf-8", "surrogatepass")) > MAX_RECIPE_BYTES:
        raise RecipeError(f"{source}: a recipe is at most {MAX_RECIPE_BYTES:,} bytes")
    try:
        data = yaml.load(text, Loader=_NoAliasLoader) if yaml_syntax else tomllib.loads(text)
    except (tomllib.TOMLDecodeError, yaml.YAMLError) as error:
        raise RecipeError(f"{source}: not valid {'YAML' if yaml_syntax else 'TOML'}: "
                          f"{' '.join(str(error).split())}") from error
    except RecursionError as error:
        raise RecipeError(f"{source}: nested more than the parser can read") from error
    if _depth(data, MAX_NESTING) > MAX_NESTING:
        raise RecipeError(f"{source}: nested deeper than {MAX_NESTING} levels")
    if not isinstance(data, dict):
        raise RecipeError(f"{source}: a recipe is a table of fields")
    known = {"name", "description", "stage", "stages", "weights", "min_size", "max_size", "rank_by"}
    unknown = sorted(set(data) - known)
    if unknown:
        raise RecipeError(f"{source}: unknown fields {unknown}; known: {sorted(known)}")
    name = data.get("name")
    if not isinstance(name, str) or not NAME_PATTERN.match(name):
        raise RecipeError(f"{source}: name must match {NAME_PATTERN.pattern} (it names a folder), got {name!r}")
    stages = data.get("stage", data.get("stages"))
    if not isinstance(stages, list) or not stages:
        raise RecipeError(f"{source}: give at least one [[stage]]")
    if len(stages) > MAX_STAGES:
        raise RecipeError(f"{source}: {len(stages)} stages; a recipe has at most {MAX_STAGES}")
    if not isinstance(data.get("description", ""), str):
        raise RecipeError(f"{source}: description must be a string")
    for index, stage in enumerate(stages):
        _check_stage(stage, f"{source}: stage {index + 1}")
    weights = _weights(data.get("weights"), source)
    min_size, max_size = data.get("min_size", 1), data.get("max_size")
    if not isinstance(min_size, int) or min_size < 0:
        raise RecipeError(f"{source}: min_size must be a non-negative integer, got {min_size!r}")
    if max_size is not None and (not isinstance(max_size, int) or max_size < max(min_size, 1)):
        raise RecipeError(f"{source}: max_size must be an integer >= min_size, got {max_size!r}")
    rank_by = data.get("rank_by")
    if max_size is not None and rank_by is None:
        raise RecipeError(f"{source}: max_size needs rank_by (the score that decides which rows stay)")
    if rank_by is not None:
        _check_score(rank_by, f"{source}: rank_by")
    return Recipe(name=name, text=text, stages=tuple(stages), description=str(data.get("description", "")),
                  weights=weights, min_size=min_size, max_size=max_size, rank_by=rank_by)


def _weights(data: Any, source: str) -> WeightSpec | None:
    if data is None:
        return None
    if not isinstance(data, dict) or not isinstance(data.get("prompt"), str) or not data["prompt"].strip():
        raise RecipeError(f"{source}: [weights] needs a prompt")
    unknown = sorted(set(data) - {"prompt", "mode", "clip_at"})
    if unknown:
        raise RecipeError(f"{source}: [weights] has unknown fields {unknown}")
    mode = data.get("mode", "self_normalised")
    if mode not in WEIGHT_MODES:
        raise RecipeError(f"{source}: [weights] mode must be one of {WEIGHT_MODES}, got {mode!r}")
    clip_at = data.get("clip_at", 10.0)
    if not isinstance(clip_at, int | float) or clip_at <= 0:
        raise RecipeError(f"{source}: [weights] clip_at must be positive, got {clip_at!r}")
    return WeightSpec(data["prompt"], mode, float(clip_at))


def _check_score(name: Any, where: str) -> None:
    if not isinstance(name, str):
        raise RecipeError(f"{where}: a score name is a string, got {name!r}")
    if name not in SCORE_COLUMNS and name not in RECIPE_SAMPLE_COLUMNS and not name.startswith("iw_"):
        raise RecipeError(f"{where}: unknown score {name!r}; scores: {list(SCORE_COLUMNS)}, "
                          f"sample columns: {list(RECIPE_SAMPLE_COLUMNS)}, importance weights: iw_<prompt>")


def _check_fraction(value: Any, where: str) -> None:
    if not isinstance(value, int | float) or isinstance(value, bool) or not 0 < value <= 1:
        raise RecipeError(f"{where}: fraction must be in (0, 1], got {value!r}")


def _check_stage(stage: Any, where: str) -> None:
    if not isinstance(stage, dict) or stage.get("type") not in STAGE_KEYS:
        raise RecipeError(f"{where}: type must be one of {sorted(STAGE_KEYS)}, got "
                          f"{stage.get('type') if isinstance(stage, dict) else stage!r}")
    kind = stage["type"]
    unknown = sorted(set(stage) - STAGE_KEYS[kind] - {"type"})
    if unknown:
        raise RecipeError(f"{where} ({kind}): unknown fields {unknown}; allowed: {sorted(STAGE_KEYS[kind])}")
    if kind in ("threshold", "top_fraction", "datacomp_top_fraction"):
        _check_score(stage.get("score"), f"{where} ({kind}) score")
    if kind == "dedup":
        _check_score(stage.get("keep"), f"{where} (dedup) keep")
        kinds = stage.get("kinds", ["image", "near"])
        if not isinstance(kinds, list) or not kinds or any(item not in DEDUP_KINDS for item in kinds):
            raise RecipeError(f"{where} (dedup): kinds must be a non-empty list of {list(DEDUP_KINDS)}, got {kinds!r}")
    if kind == "decontaminate":
        sets = stage.get("sets", [])
        if not isinstance(sets, list) or any(not isinstance(name, str) or not name for name in sets):
            raise RecipeError(f"{where} (decontaminate): sets must be a list of evaluation-set names, got {sets!r}")
    if "descending" in stage and not isinstance(stage["descending"], bool):
        raise RecipeError(f"{where} ({kind}): descending must be true or false, got {stage['descending']!r}")
    if kind == "threshold" and stage.get("min") is None and stage.get("max") is None:
        raise RecipeError(f"{where} (threshold): give min, max or both")
    for bound in ("min", "max"):
        if kind == "threshold" and bound in stage and not _is_number(stage[bound]):
            raise RecipeError(f"{where} (threshold): {bound} must be a number, got {stage[bound]!r}")
    if kind == "threshold" and _is_number(stage.get("min")) and _is_number(stage.get("max")) \
            and stage["min"] > stage["max"]:
        raise RecipeError(f"{where} (threshold): min {stage['min']} is above max {stage['max']}")
    if kind == "norm_sim_d":
        num_iters, sample_fraction, seed = (stage.get("num_iters", 10), stage.get("sample_fraction", 0.1),
                                            stage.get("seed", 0))
        if not _is_integer(num_iters) or not 1 <= num_iters <= 1000:
            raise RecipeError(f"{where} (norm_sim_d): num_iters must be an integer in [1, 1000], got {num_iters!r}")
        if not _is_number(sample_fraction) or not 0 < sample_fraction <= 1:
            raise RecipeError(f"{where} (norm_sim_d): sample_fraction must be in (0, 1], got {sample_fraction!r}")
        if not _is_integer(seed) or seed < 0:
            raise RecipeError(f"{where} (norm_sim_d): seed must be a non-negative integer, got {seed!r}")
    if kind in ("top_fraction", "datacomp_top_fraction", "rank_sum", "norm_sim_d"):
        _check_fraction(stage.get("fraction"), f"{where} ({kind})")
    if stage.get("of", "pool") not in ("pool", "current"):
        raise RecipeError(f"{where} ({kind}): of must be 'pool' or 'current', got {stage['of']!r}")
    if kind == "rank_sum":
        scores = stage.get("scores")
        if not isinstance(scores, list) or not scores:
            raise RecipeError(f"{where} (rank_sum): scores must be a non-empty list")
        for name in scores:
            _check_score(name, f"{where} (rank_sum) scores")
        weights = stage.get("weights")
        if weights is not None and (not isinstance(weights, list) or len(weights) != len(scores)
                                    or not all(_is_number(w) and w >= 0 for w in weights) or not any(weights)):
            raise RecipeError(f"{where} (rank_sum): weights must be {len(scores)} non-negative numbers (one per "
                              f"score, not all 0), got {weights!r}")
    if kind == "is_in" and (not isinstance(stage.get("values"), list) or not isinstance(stage.get("column"), str)):
        raise RecipeError(f"{where} (is_in): give a column and a list of values")
    if kind == "is_in" and (len(stage["values"]) > MAX_LIST_ITEMS
                            or not all(isinstance(v, str | int | float) for v in stage["values"])):
        raise RecipeError(f"{where} (is_in): values must be at most {MAX_LIST_ITEMS:,} strings or numbers")
    if kind == "is_in":
        _check_score(stage["column"], f"{where} (is_in) column")
    if kind == "intersection":
        inner = stage.get("stages")
        if not isinstance(inner, list) or not inner:
            raise RecipeError(f"{where} (intersection): give stages = [...]")
        for index, child in enumerate(inner):
            _check_stage(child, f"{where} (intersection) stage {index + 1}")


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _is_integer(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _walk(stages: Sequence[dict[str, Any]]):
    for stage in stages:
        yield stage
        if stage["type"] == "intersection":
            yield from _walk(stage["stages"])


def _columns_of(stage: dict[str, Any]) -> list[str]:
    kind = stage["type"]
    if kind in ("threshold", "top_fraction", "datacomp_top_fraction"):
        return [stage["score"]]
    if kind == "dedup":
        return [stage["keep"]]
    if kind == "rank_sum":
        return list(stage["scores"])
    if kind == "is_in":
        return [stage["column"]]
    if kind == "basic_filter":
        return list(RECIPE_SAMPLE_COLUMNS)
    return []


def _policy(stage: dict[str, Any], embeddings: EmbeddingSource | None) -> Policy:
    kind = stage["type"]
    of = stage.get("of", "pool")
    builders: dict[str, Callable[[], Policy]] = {
        "threshold": lambda: Threshold(stage["score"], stage.get("min"), stage.get("max")),
        "top_fraction": lambda: TopFraction(stage["score"], float(stage["fraction"]), of,
                                            stage.get("descending", True)),
        "datacomp_top_fraction": lambda: DataCompTopFraction(stage["score"], float(stage["fraction"]), of,
                                                             stage.get("descending", True)),
        "rank_sum": lambda: RankSum(tuple(stage["scores"]), float(stage["fraction"]),
                                    tuple(stage["weights"]) if stage.get("weights") else None, of,
                                    stage.get("descending", True)),
        "is_in": lambda: IsIn(stage["column"], tuple(stage["values"])),
        "intersection": lambda: Intersection(*[_policy(child, embeddings) for child in stage["stages"]]),
        "basic_filter": basic_filter,
        "dedup": lambda: Dedup(stage["keep"], tuple(stage.get("kinds", ["image", "near"])),
                               stage.get("descending", True)),
        "decontaminate": lambda: Decontaminate(tuple(stage.get("sets", []))),
        "norm_sim_d": lambda: NormSimD(float(stage["fraction"]), _require(embeddings),
                                       stage.get("num_iters", 10), stage.get("sample_fraction", 0.1),
                                       stage.get("seed", 0), of),
    }
    return builders[kind]()


def _require(embeddings: EmbeddingSource | None) -> EmbeddingSource:
    if embeddings is None:
        raise RecipeError("a norm_sim_d stage needs the pool's image embeddings")
    return embeddings
