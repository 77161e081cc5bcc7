"""The app's files: a new folder for every set under the output folder, zips of sets, and checked uploads.

Everything the page makes the server write is under the output folder; the only files it makes the server read are
the uploads (checked to be images of a bounded size) and what it wrote there.
"""

import re
import shutil
import zipfile
from pathlib import Path

from PIL import Image, UnidentifiedImageError

APP_FOLDER = ".app"
"""The app's own files under the output folder: uploads and served files (`cache/`), zips (`downloads/`)."""
MAX_PIXELS = 64_000_000
"""The largest uploaded image, in pixels (Pillow's decompression-bomb limit is larger)."""


def slug(text: str, length: int = 40) -> str:
    """Text as a file-name part: lower-case letters, digits and dashes."""
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:length].rstrip("-") or "set"


def new_set_folder(out: Path, name: str) -> Path:
    """Create a new, empty folder for a set under `out`: `NNNN-<name>`, numbered after the folders already there.

    Args:
        out: The output folder (created if needed).
        name: Words that name the set (made into a slug).

    Returns:
        The new folder; it never is one that existed before.
    """
    out.mkdir(parents=True, exist_ok=True)
    numbers = [int(match[1]) for path in out.iterdir() if (match := re.match(r"(\d{4,})-", path.name))]
    number = max(numbers, default=0) + 1
    while True:
        folder = out / f"{number:04d}-{slug(name)}"
        try:
            folder.mkdir()
        except FileExistsError:
            number += 1
            continue
        return folder


def zip_folder(folder: Path, destination: Path) -> Path:
    """Write a zip of a folder's files (its name as the zip's top folder), atomically.

    Returns:
        The zip file.
    """
    destination.parent.mkdir(parents=True, exist_ok=True)
    partial = destination.with_name(f".{destination.name}.partial")
    with zipfile.ZipFile(partial, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for path in sorted(folder.rglob("*")):
            if path.is_file() and not path.name.startswith("."):
                archive.write(path, Path(folder.name) / path.relative_to(folder))
    partial.replace(destination)
    return destination


def read_upload(path: str | Path, *, uploads: Path, max_bytes: int) -> Image.Image:
    """Read an uploaded reference image, checked.

    Args:
        path: The uploaded file, as the page gives it.
        uploads: The folder uploads are kept in; any other path is refused.
        max_bytes: The largest file accepted.

    Returns:
        The image, loaded.

    Raises:
        ValueError: If the file is not an upload, is too large, or is not an image Pillow reads.
    """
    file = Path(path).resolve()
    if not file.is_relative_to(uploads.resolve()) or not file.is_file():
        raise ValueError("the reference image must be uploaded from the page")
    if file.stat().st_size > max_bytes:
        raise ValueError(f"the uploaded image is larger than {max_bytes / 1e6:g} MB")
    try:
        with Image.open(file) as image:
            if image.width * image.height > MAX_PIXELS:
                raise ValueError(f"the uploaded image has more than {MAX_PIXELS / 1e6:g} megapixels")
            image.load()
            return image.copy()
    except (OSError, UnidentifiedImageError, Image.DecompressionBombError, SyntaxError) as error:
        raise ValueError(f"the uploaded file is not an image: {error}") from None


def kept_upload(path: str | Path, folder: Path) -> Path:
    """Where `keep_upload` copies an uploaded image in a set's folder (`reference-image.<ext>`)."""
    suffix = Path(path).suffix.lower()
    return folder / ("reference-image" + (suffix if re.fullmatch(r"\.[a-z0-9]{1,5}", suffix) else ""))


def keep_upload(path: str | Path, folder: Path) -> Path:
    """Copy an uploaded image into a set's folder (see `kept_upload`), so that its sidecar can name it."""
    target = kept_upload(path, folder)
    shutil.copyfile(path, target)
    return target
