"""Metadata the Dagster UI shows inline: PNGs as markdown data URIs, downscaled to fit the asset page."""

import base64
import io
from html import escape

import dagster as dg
from PIL import Image

UI_IMAGE_WIDTH = 720  # px: the width of the metadata panel; wider figures are downscaled
INLINE_MARKDOWN_CHARS = 1000  # Dagster 1.13 draws longer markdown metadata behind "[Show Markdown]" only


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


def bar_chart_markdown(name: str, bars: list[tuple[str, int]], width: int = 360) -> str | None:
    """A horizontal bar chart as a tiny SVG data URI, short enough for the UI to draw inline (None when it
    would not be: too many or too long labels)."""
    top = max([count for _, count in bars] + [1])
    rects = "".join(f'<rect y="{18 * index}" width="{max(1, round(width * count / top))}" height="15"/>'
                    for index, (_, count) in enumerate(bars))
    texts = "".join(f'<text x="3" y="{18 * index + 12}">{count:,} {escape(label)}</text>'
                    for index, (label, count) in enumerate(bars))
    svg = (f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{18 * len(bars)}">'
           f'<g fill="#9cc">{rects}</g><g font-size="11">{texts}</g></svg>')
    markdown = f"![{name}](data:image/svg+xml;base64,{base64.b64encode(svg.encode()).decode()})"
    return markdown if len(markdown) < INLINE_MARKDOWN_CHARS else None
