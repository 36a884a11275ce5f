"""What a demo image shows: one small frozen record per visual domain, and how to draw one at random.

The records are the ground truth. Renderers turn them into pixels and caption templates into words,
so image and caption agree by construction, and zero-shot labels can be read straight off them.
Every domain has one *primary* attribute (shape, character, pattern, time of day) that evaluation
tasks can pin to a class.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TypeVar

import numpy as np

from curation_platform.demo.vocabulary import COLOURS, POSITIONS, RGB, WHITE

DOMAINS = ("shapes", "glyphs", "textures", "scenes")

SHAPES = ("circle", "square", "triangle", "star", "hexagon", "diamond", "cross")
SHAPE_SIZES = ("small", "large")
DIGITS = tuple("0123456789")
# I and O are left out: at 64 px they are indistinguishable from 1 and 0.
LETTERS = tuple("ABCDEFGHJKLMNPQRSTUVWXYZ")
PATTERNS = ("stripes", "checkerboard", "dots", "grid", "waves")
ORIENTED_PATTERNS = frozenset({"stripes", "waves"})
ORIENTATIONS = ("horizontal", "vertical", "diagonal")
TEXTURE_SCALES = ("fine", "coarse")
TIMES_OF_DAY = ("day", "night")
GROUNDS = ("grass", "snow", "sand")

_BACKGROUND_WEIGHTS = {"white": 0.5, "cream": 0.15, "light grey": 0.1, "light blue": 0.1, "black": 0.15}
# Foregrounds that stay legible on each background once downscaled.
_LIGHT_BACKGROUND_COLOURS = tuple(name for name in COLOURS if name != "yellow")
_DARK_BACKGROUND_COLOURS = ("red", "orange", "yellow", "green", "pink")
_MIN_TEXTURE_CONTRAST = 140.0

T = TypeVar("T")


@dataclass(frozen=True)
class ShapesAttributes:
    shape: str
    colour: str
    size: str
    position: str
    count: int
    background: str


@dataclass(frozen=True)
class GlyphAttributes:
    character: str
    kind: str  # "digit" or "letter"
    colour: str
    background: str


@dataclass(frozen=True)
class TextureAttributes:
    pattern: str
    foreground: str
    background: str
    orientation: str | None  # only for stripes and waves
    scale: str


@dataclass(frozen=True)
class SceneAttributes:
    time_of_day: str
    ground: str
    houses: int
    trees: int
    cars: int


Attributes = ShapesAttributes | GlyphAttributes | TextureAttributes | SceneAttributes


def domain_of(attributes: Attributes) -> str:
    return {
        ShapesAttributes: "shapes",
        GlyphAttributes: "glyphs",
        TextureAttributes: "textures",
        SceneAttributes: "scenes",
    }[type(attributes)]


def pick(rng: np.random.Generator, options: Sequence[T]) -> T:
    """A uniformly chosen element, keeping its Python type (``rng.choice`` would give numpy's)."""
    return options[int(rng.integers(len(options)))]


def sample_attributes(domain: str, rng: np.random.Generator, primary: str | None = None) -> Attributes:
    """Draw a random record of ``domain``; ``primary`` pins the domain's primary attribute."""
    if domain == "shapes":
        return _sample_shapes(rng, primary)
    if domain == "glyphs":
        return _sample_glyph(rng, primary)
    if domain == "textures":
        return _sample_texture(rng, primary)
    if domain == "scenes":
        return _sample_scene(rng, primary)
    raise ValueError(f"unknown domain {domain!r}; expected one of {DOMAINS}")


def _background(rng: np.random.Generator) -> str:
    names = tuple(_BACKGROUND_WEIGHTS)
    return names[int(rng.choice(len(names), p=tuple(_BACKGROUND_WEIGHTS.values())))]


def _foreground(rng: np.random.Generator, background: str) -> str:
    return pick(rng, _DARK_BACKGROUND_COLOURS if background == "black" else _LIGHT_BACKGROUND_COLOURS)


def _sample_shapes(rng: np.random.Generator, shape: str | None) -> ShapesAttributes:
    background = _background(rng)
    size = pick(rng, SHAPE_SIZES)
    position = pick(rng, POSITIONS)
    # Two large shapes are all a quadrant holds without overlap.
    max_count = 2 if size == "large" and position != "center" else 4
    return ShapesAttributes(
        shape=shape or pick(rng, SHAPES),
        colour=_foreground(rng, background),
        size=size,
        position=position,
        count=int(rng.integers(1, max_count + 1)),
        background=background,
    )


def _sample_glyph(rng: np.random.Generator, character: str | None) -> GlyphAttributes:
    if character is None:
        kind = "digit" if rng.random() < 0.5 else "letter"
        character = pick(rng, DIGITS if kind == "digit" else LETTERS)
    else:
        kind = "digit" if character.isdigit() else "letter"
    background = _background(rng)
    return GlyphAttributes(
        character=character,
        kind=kind,
        colour=_foreground(rng, background),
        background=background,
    )


def _contrast(first: RGB, second: RGB) -> float:
    return float(np.linalg.norm(np.subtract(first, second)))


def _sample_texture(rng: np.random.Generator, pattern: str | None) -> TextureAttributes:
    pattern = pattern or pick(rng, PATTERNS)
    palette = {**COLOURS, "white": WHITE}
    foreground = pick(rng, tuple(COLOURS))
    backgrounds = tuple(
        name for name, rgb in palette.items() if _contrast(rgb, COLOURS[foreground]) >= _MIN_TEXTURE_CONTRAST
    )
    return TextureAttributes(
        pattern=pattern,
        foreground=foreground,
        background=pick(rng, backgrounds),
        orientation=pick(rng, ORIENTATIONS) if pattern in ORIENTED_PATTERNS else None,
        scale=pick(rng, TEXTURE_SCALES),
    )


def _sample_scene(rng: np.random.Generator, time_of_day: str | None) -> SceneAttributes:
    time_of_day = time_of_day or pick(rng, TIMES_OF_DAY)
    ground = pick(rng, GROUNDS)
    while True:  # one to four objects keep every object large enough to recognise
        houses, trees, cars = int(rng.integers(0, 3)), int(rng.integers(0, 4)), int(rng.integers(0, 3))
        if 1 <= houses + trees + cars <= 4:
            return SceneAttributes(time_of_day, ground, houses, trees, cars)

