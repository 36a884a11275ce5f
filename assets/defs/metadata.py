"""Metadata the Dagster UI shows inline: PNGs as markdown data URIs, downscaled to fit the asset page."""

import base64
import io

import dagster as dg
from PIL import Image

UI_IMAGE_WIDTH = 720  # px: the width of the metadata panel; wider figures are downscaled


def png_markdown(name: str, png: bytes, max_width: int = UI_IMAGE_WIDTH) -> str:
    """``![name](data:image/png;base64,...)``, the PNG downscaled to at most ``max_width`` pixels wide."""
    image = Image.open(io.BytesIO(png))
    if image.width > max_width:
        height = max(1, round(image.height * max_width / image.width))
        buffer = io.BytesIO()
        image.resize((max_width, height), Image.Resampling.LANCZOS).save(buffer, format="PNG", optimize=True)
        png = buffer.getvalue()
    return f"![{name.removesuffix('_png')}](data:image/png;base64,{base64.b64encode(png).decode()})"


def png_metadata(name: str, png: bytes, max_width: int = UI_IMAGE_WIDTH) -> dg.MetadataValue:
    return dg.MetadataValue.md(png_markdown(name, png, max_width))
