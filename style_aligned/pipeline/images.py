"""Image files: atomic PNG writing, labelled contact sheets, and reference images fitted to a size."""

import os
import textwrap
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

from PIL import Image, ImageDraw, ImageFont, ImageOps

from style_aligned.weights.safetensors_io import partial_name, remove_stale_partials

Fit = Literal["crop", "resize"]


def save_png(image: Image.Image, path: Path) -> None:
    """Write a PNG atomically: a temporary file beside `path`, renamed when complete."""
    remove_stale_partials(path)
    temporary = partial_name(path)
    try:
        image.save(temporary, format="PNG")
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


def labelled_grid(
    images: Sequence[Image.Image],
    labels: Sequence[str],
    columns: int | None = None,
    *,
    title: str | None = None,
) -> Image.Image:
    """Lay images out on a white sheet, each with its label (wrapped) below it.

    Args:
        images: The images, all of the same size.
        labels: One label per image.
        columns: Images per row (default: all on one row, up to 8).
        title: A line of text above the grid.

    Returns:
        The contact sheet.
    """
    if len(images) != len(labels) or not images:
        raise ValueError("labelled_grid needs as many labels as images, and at least one image")
    width, height = images[0].size
    columns = columns or min(len(images), 8)
    rows = -(-len(images) // columns)
    font_size = max(10, min(18, width // 16))
    font = ImageFont.load_default(size=font_size)
    characters = max(8, int(width / (font_size * 0.55)))
    wrapped = [textwrap.wrap(label, characters)[:3] or [""] for label in labels]
    label_height = (max(len(lines) for lines in wrapped) * (font_size + 3)) + 8
    title_height = font_size + 14 if title else 0
    margin = 8
    sheet = Image.new(
        "RGB",
        (columns * (width + margin) + margin, title_height + rows * (height + label_height + margin) + margin),
        "white",
    )
    draw = ImageDraw.Draw(sheet)
    if title:
        draw.text((margin, margin), title, fill="black", font=font)
    for index, (image, lines) in enumerate(zip(images, wrapped, strict=True)):
        x = margin + (index % columns) * (width + margin)
        y = title_height + margin + (index // columns) * (height + label_height + margin)
        sheet.paste(image.convert("RGB"), (x, y))
        for line_number, line in enumerate(lines):
            draw.text((x, y + height + 4 + line_number * (font_size + 3)), line, fill="black", font=font)
    return sheet


def fit_image(image: Image.Image, width: int, height: int, *, fit: Fit = "crop") -> Image.Image:
    """Convert any PIL image to RGB at the given size.

    Transparent images are composited over white; grayscale and palette images are converted to RGB.

    Args:
        image: The image.
        width: The target width.
        height: The target height.
        fit: `"crop"` scales the image to cover the size and crops the centre (keeps the aspect ratio);
            `"resize"` stretches it to the size.

    Returns:
        An RGB image of exactly `width` x `height`.
    """
    image = ImageOps.exif_transpose(image)
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, "white")
        image = Image.alpha_composite(background, rgba)
    image = image.convert("RGB")
    if fit == "resize":
        return image.resize((width, height), Image.Resampling.LANCZOS)
    return ImageOps.fit(image, (width, height), Image.Resampling.LANCZOS, centering=(0.5, 0.5))
