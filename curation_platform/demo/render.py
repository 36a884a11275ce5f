"""Draw attribute records as RGB images of any size, including extreme aspect ratios.

Everything is sized relative to the canvas so the named attributes (shape, colour, position,
count, character, pattern, time of day) stay recognisable after a downscale to 64x64 px. The
``rng`` only moves things within what the attributes allow (jitter, exact tints, phases), which
also makes every rendered image unique.
"""

from __future__ import annotations

import math
import textwrap
from functools import lru_cache, singledispatch

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from curation_platform.demo.attributes import (
    Attributes,
    GlyphAttributes,
    SceneAttributes,
    ShapesAttributes,
    TextureAttributes,
    pick,
)
from curation_platform.demo.vocabulary import BACKGROUNDS, COLOURS, RGB, WHITE

Size = tuple[int, int]
Point = tuple[float, float]

_SHAPE_RADIUS = {"small": 0.06, "large": 0.11}  # fraction of the shorter canvas side
_GRID_FOR_COUNT = {1: (1, 1), 2: (2, 1), 3: (3, 1), 4: (2, 2)}
_QUADRANT_ORIGIN = {
    "top left": (0.0, 0.0),
    "top right": (0.5, 0.0),
    "bottom left": (0.0, 0.5),
    "bottom right": (0.5, 0.5),
}
_TEXTURE_PERIODS = {"fine": (9.0, 12.0), "coarse": (4.0, 6.0)}  # periods per shorter side
_SKY = {"day": ((110, 175, 235), (190, 225, 250)), "night": ((10, 14, 40), (35, 45, 90))}
_GROUND = {"grass": (80, 165, 70), "snow": (236, 240, 246), "sand": (226, 200, 140)}
_HOUSE_WALLS = ((200, 85, 60), (230, 200, 120), (185, 185, 195), (160, 110, 75))
_CAR_BODIES = ("red", "blue", "yellow", "green", "orange")


def tint(rgb: RGB, rng: np.random.Generator, spread: int = 10) -> RGB:
    """The named colour, nudged a little so no two renders share exact pixel values."""
    r, g, b = (int(np.clip(channel + rng.integers(-spread, spread + 1), 0, 255)) for channel in rgb)
    return (r, g, b)


@lru_cache(maxsize=128)
def font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    """Pillow's bundled scalable font: no font files needed on the machine."""
    return ImageFont.load_default(size=size)


@singledispatch
def render(attributes: Attributes, size: Size, rng: np.random.Generator) -> Image.Image:
    """An RGB image of ``size`` (width, height) showing exactly ``attributes``."""
    raise TypeError(f"no renderer for {type(attributes).__name__}")


@render.register
def _(attributes: ShapesAttributes, size: Size, rng: np.random.Generator) -> Image.Image:
    width, height = size
    image = Image.new("RGB", size, tint(BACKGROUNDS[attributes.background], rng, spread=4))
    draw = ImageDraw.Draw(image)
    if attributes.position == "center":
        left, top, region_width, region_height = 0.2 * width, 0.2 * height, 0.6 * width, 0.6 * height
    else:
        origin_x, origin_y = _QUADRANT_ORIGIN[attributes.position]
        left, top, region_width, region_height = origin_x * width, origin_y * height, 0.5 * width, 0.5 * height
    columns, rows = _GRID_FOR_COUNT[attributes.count]
    if attributes.count == 3 and attributes.size == "large":
        columns, rows = 2, 2
    cells = [(column, row) for row in range(rows) for column in range(columns)]
    if len(cells) > attributes.count:
        cells.pop(int(rng.integers(len(cells))))
    cell_width, cell_height = region_width / columns, region_height / rows
    colour = tint(COLOURS[attributes.colour], rng)
    for column, row in cells:
        radius = _SHAPE_RADIUS[attributes.size] * min(size) * rng.uniform(0.95, 1.05)
        slack_x = max(0.0, cell_width / 2 - radius) * 0.6
        slack_y = max(0.0, cell_height / 2 - radius) * 0.6
        centre = (
            left + (column + 0.5) * cell_width + rng.uniform(-slack_x, slack_x),
            top + (row + 0.5) * cell_height + rng.uniform(-slack_y, slack_y),
        )
        rotation = rng.uniform(-15.0, 15.0)
        if attributes.shape == "circle":
            x, y = centre
            draw.ellipse((x - radius, y - radius, x + radius, y + radius), fill=colour)
        else:
            draw.polygon(_outline(attributes.shape, centre, radius, rotation), fill=colour)
    return image


def _outline(shape: str, centre: Point, radius: float, rotation_degrees: float) -> list[Point]:
    """Polygon vertices of a shape of circumradius ``radius``, rotated about its centre."""
    if shape == "square":
        polar = [(radius, 45.0 + 90.0 * i) for i in range(4)]
    elif shape == "triangle":
        polar = [(radius, -90.0 + 120.0 * i) for i in range(3)]
    elif shape == "hexagon":
        polar = [(radius, 60.0 * i) for i in range(6)]
    elif shape == "star":
        polar = [(radius if i % 2 == 0 else 0.45 * radius, -90.0 + 36.0 * i) for i in range(10)]
    elif shape == "diamond":
        polar = [(radius, -90.0), (0.65 * radius, 0.0), (radius, 90.0), (0.65 * radius, 180.0)]
    elif shape == "cross":
        arm = 0.33 * radius
        cartesian = [
            (-arm, -arm), (-arm, -radius), (arm, -radius), (arm, -arm), (radius, -arm), (radius, arm),
            (arm, arm), (arm, radius), (-arm, radius), (-arm, arm), (-radius, arm), (-radius, -arm),
        ]
        polar = [(math.hypot(x, y), math.degrees(math.atan2(y, x))) for x, y in cartesian]
    else:
        raise ValueError(f"unknown shape {shape!r}")
    cx, cy = centre
    return [
        (cx + r * math.cos(math.radians(a + rotation_degrees)), cy + r * math.sin(math.radians(a + rotation_degrees)))
        for r, a in polar
    ]


@render.register
def _(attributes: GlyphAttributes, size: Size, rng: np.random.Generator) -> Image.Image:
    width, height = size
    image = Image.new("RGB", size, tint(BACKGROUNDS[attributes.background], rng, spread=4))
    # The glyph's cap height is ~0.75 of the font size; keep it inside both sides of the canvas.
    font_size = max(6, int(min(height * rng.uniform(0.7, 1.0), width * rng.uniform(0.8, 1.1))))
    centre = (width * (0.5 + rng.uniform(-0.06, 0.06)), height * (0.5 + rng.uniform(-0.06, 0.06)))
    ImageDraw.Draw(image).text(
        centre, attributes.character, font=font(font_size), fill=tint(COLOURS[attributes.colour], rng), anchor="mm"
    )
    return image


@render.register
def _(attributes: TextureAttributes, size: Size, rng: np.random.Generator) -> Image.Image:
    width, height = size
    low, high = _TEXTURE_PERIODS[attributes.scale]
    period = min(size) / rng.uniform(low, high)
    phase = rng.uniform(0.0, period)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    if attributes.orientation == "horizontal":
        across, along = y, x
    elif attributes.orientation == "vertical":
        across, along = x, y
    else:
        across, along = (x + y) / math.sqrt(2.0), (x - y) / math.sqrt(2.0)

    if attributes.pattern == "stripes":
        mask = (across + phase) % period < period / 2
    elif attributes.pattern == "waves":
        wavelength = period * rng.uniform(2.5, 4.0)
        wavy = across + 0.35 * period * np.sin(2.0 * math.pi * along / wavelength)
        mask = (wavy + phase) % period < period / 2
    elif attributes.pattern == "checkerboard":
        mask = (np.floor((x + phase) / period) + np.floor((y + phase) / period)) % 2 == 0
    elif attributes.pattern == "dots":
        dx, dy = (x + phase) % period - period / 2, (y + phase) % period - period / 2
        mask = dx * dx + dy * dy < (0.3 * period) ** 2
    elif attributes.pattern == "grid":
        thickness = max(2.0, 0.14 * period)
        mask = ((x + phase) % period < thickness) | ((y + phase) % period < thickness)
    else:
        raise ValueError(f"unknown pattern {attributes.pattern!r}")

    palette = {**COLOURS, "white": WHITE}
    foreground = np.array(tint(palette[attributes.foreground], rng), dtype=np.uint8)
    background = np.array(tint(palette[attributes.background], rng), dtype=np.uint8)
    return Image.fromarray(np.where(mask[..., None], foreground, background))


@render.register
def _(attributes: SceneAttributes, size: Size, rng: np.random.Generator) -> Image.Image:
    width, height = size
    horizon = int(height * rng.uniform(0.55, 0.7))
    night = attributes.time_of_day == "night"
    top, bottom = (np.array(tint(rgb, rng, spread=6), dtype=np.float32) for rgb in _SKY[attributes.time_of_day])
    blend = np.linspace(0.0, 1.0, height, dtype=np.float32)[:, None, None]
    pixels = np.broadcast_to((1 - blend) * top + blend * bottom, (height, width, 3))
    image = Image.fromarray(pixels.astype(np.uint8))
    draw = ImageDraw.Draw(image)
    unit = min(size)

    ground = np.array(tint(_GROUND[attributes.ground], rng, spread=6)) * (0.45 if night else 1.0)
    draw.rectangle((0, horizon, width, height), fill=tuple(int(c) for c in ground))

    body_x, body_y, body_radius = width * rng.uniform(0.15, 0.85), horizon * rng.uniform(0.2, 0.4), 0.09 * unit
    body_box = (body_x - body_radius, body_y - body_radius, body_x + body_radius, body_y + body_radius)
    if night:
        for _ in range(int(rng.integers(10, 30))):
            sx, sy = rng.uniform(0, width), rng.uniform(0, horizon * 0.9)
            draw.ellipse((sx - 1, sy - 1, sx + 1, sy + 1), fill=(235, 235, 210))
        draw.ellipse(body_box, fill=(240, 236, 200))
        # A sky-coloured disc over part of the moon leaves a crescent.
        shift_x, shift_y = 0.45 * body_radius, -0.2 * body_radius
        sky_at_moon = (1 - body_y / height) * top + (body_y / height) * bottom
        draw.ellipse(
            (body_box[0] + shift_x, body_box[1] + shift_y, body_box[2] + shift_x, body_box[3] + shift_y),
            fill=tuple(int(c) for c in sky_at_moon),
        )
    else:
        draw.ellipse(body_box, fill=tint((250, 215, 40), rng))

    objects = ["house"] * attributes.houses + ["tree"] * attributes.trees + ["car"] * attributes.cars
    order = rng.permutation(len(objects))
    slot = width / len(objects)
    for position, index in enumerate(order):
        centre_x = (position + 0.5) * slot + rng.uniform(-0.1, 0.1) * slot
        base_y = horizon + (height - horizon) * rng.uniform(0.15, 0.45)
        scale = min(0.85 * slot, 0.32 * unit)
        _draw_object(draw, objects[index], centre_x, base_y, scale, night, rng)
    return image


def _draw_object(
    draw: ImageDraw.ImageDraw, kind: str, x: float, base: float, scale: float, night: bool, rng: np.random.Generator
) -> None:
    """One scene object standing on ``base``, ``scale`` px wide."""
    shade = 0.55 if night else 1.0

    def dim(rgb: RGB) -> RGB:
        r, g, b = tint(rgb, rng)
        return (int(r * shade), int(g * shade), int(b * shade))

    if kind == "house":
        half, wall_height = scale / 2, 0.75 * scale
        draw.rectangle((x - half, base - wall_height, x + half, base), fill=dim(pick(rng, _HOUSE_WALLS)))
        eaves = base - wall_height
        roof = [(x - half * 1.15, eaves), (x + half * 1.15, eaves), (x, eaves - 0.5 * scale)]
        draw.polygon(roof, fill=dim((125, 40, 30)))
        draw.rectangle((x - 0.1 * scale, base - 0.38 * scale, x + 0.1 * scale, base), fill=dim((80, 50, 30)))
        window = (255, 225, 110) if night else (170, 210, 240)
        for side in (-1, 1):
            wx = x + side * 0.28 * scale
            draw.rectangle((wx - 0.09 * scale, base - 0.6 * scale, wx + 0.09 * scale, base - 0.42 * scale), fill=window)
    elif kind == "tree":
        trunk_width, trunk_height, crown = 0.16 * scale, 0.45 * scale, 0.42 * scale
        draw.rectangle((x - trunk_width / 2, base - trunk_height, x + trunk_width / 2, base), fill=dim((110, 70, 35)))
        crown_y = base - trunk_height - 0.7 * crown
        draw.ellipse((x - crown, crown_y - crown, x + crown, crown_y + crown), fill=dim((35, 130, 45)))
    elif kind == "car":
        half, body_height, wheel = scale / 2, 0.22 * scale, 0.1 * scale
        bottom = base - wheel
        colour = dim(COLOURS[pick(rng, _CAR_BODIES)])
        draw.rectangle((x - half, bottom - body_height, x + half, bottom), fill=colour)
        draw.polygon(
            [(x - 0.3 * scale, bottom - body_height), (x - 0.18 * scale, bottom - 2 * body_height),
             (x + 0.2 * scale, bottom - 2 * body_height), (x + 0.32 * scale, bottom - body_height)],
            fill=colour,
        )
        for wx in (x - 0.28 * scale, x + 0.28 * scale):
            draw.ellipse((wx - wheel, bottom - wheel, wx + wheel, bottom + wheel), fill=(20, 20, 20))
        if night:
            draw.ellipse((x + half - 0.06 * scale, bottom - 0.8 * body_height, x + half + 0.02 * scale,
                          bottom - 0.4 * body_height), fill=(255, 240, 150))
    else:
        raise ValueError(f"unknown scene object {kind!r}")


def render_text(text: str, size: Size, rng: np.random.Generator) -> Image.Image:
    """The text itself, typeset on a plain page: what a caption-as-image spam sample looks like."""
    width, height = size
    background = pick(rng, ((255, 255, 255), (250, 243, 224), (235, 235, 235)))
    ink = pick(rng, ((20, 20, 20), (40, 40, 120), (120, 20, 20)))
    image = Image.new("RGB", size, background)
    font_size = max(8, height // 4)
    while True:
        typeface = font(font_size)
        per_line = max(4, int(0.9 * width / max(1.0, typeface.getlength("x"))))
        lines = textwrap.wrap(text, per_line) or [text]
        fits = max(typeface.getlength(line) for line in lines) <= 0.92 * width
        if (fits and len(lines) * 1.25 * font_size <= 0.9 * height) or font_size <= 8:
            break
        font_size = max(8, int(font_size * 0.85))
    draw = ImageDraw.Draw(image)
    line_height = 1.25 * font_size
    first = height / 2 - line_height * (len(lines) - 1) / 2
    for number, line in enumerate(lines):
        draw.text((width / 2, first + number * line_height), line, font=typeface, fill=ink, anchor="mm")
    return image
