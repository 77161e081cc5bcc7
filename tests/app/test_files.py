"""The app's files: new set folders, zips, checked uploads, and the reference preview (no model, no browser)."""

import zipfile
from pathlib import Path

import pytest
import torch
from PIL import Image

from style_aligned.app.files import keep_upload, new_set_folder, read_upload, zip_folder
from style_aligned.app.preview import latent_preview


def test_every_set_gets_a_new_folder(tmp_path: Path) -> None:
    out = tmp_path / "sets"
    first = new_set_folder(out, "A toy train. Macro photo!")
    (out / "0007-kept-from-before").mkdir()
    second = new_set_folder(out, "../../etc/passwd")
    assert first == out / "0001-a-toy-train-macro-photo" and first.is_dir()
    assert second == out / "0008-etc-passwd" and second.parent == out
    assert new_set_folder(out, "") == out / "0009-set"


def test_a_zip_holds_the_set_folder(tmp_path: Path) -> None:
    folder = tmp_path / "0001-set"
    folder.mkdir()
    (folder / "set.json").write_text("{}")
    (folder / "00-reference-a.png").write_bytes(b"png")
    (folder / ".00-a.png.partial").write_bytes(b"")
    archive = zip_folder(folder, tmp_path / "downloads" / "0001-set.zip")
    assert sorted(zipfile.ZipFile(archive).namelist()) == ["0001-set/00-reference-a.png", "0001-set/set.json"]


def test_uploads_are_images_of_bounded_size_from_the_upload_folder(tmp_path: Path) -> None:
    uploads = tmp_path / "uploads"
    uploads.mkdir()
    good = uploads / "style.png"
    Image.new("RGB", (40, 30), "orange").save(good)
    assert read_upload(good, uploads=uploads, max_bytes=10_000).size == (40, 30)
    (uploads / "fake.png").write_text("not an image")
    with pytest.raises(ValueError, match="the uploaded file is not an image"):
        read_upload(uploads / "fake.png", uploads=uploads, max_bytes=10_000)
    with pytest.raises(ValueError, match="larger than 1e-05 MB"):
        read_upload(good, uploads=uploads, max_bytes=10)
    outside = tmp_path / "elsewhere.png"
    Image.new("RGB", (4, 4)).save(outside)
    for path in (outside, uploads / ".." / "elsewhere.png"):
        with pytest.raises(ValueError, match="must be uploaded from the page"):
            read_upload(path, uploads=uploads, max_bytes=10_000)
    kept = keep_upload(good, tmp_path)
    assert kept == tmp_path / "reference-image.png" and kept.read_bytes() == good.read_bytes()


def test_preview_of_a_latent() -> None:
    latent = torch.zeros(1, 4, 8, 12)
    latent[0, 0] = 2.0
    image = latent_preview(latent, "sd1")
    assert image.size == (96, 64) and image.mode == "RGB"
    assert image.getpixel((10, 10)) == (217, 186, 210)  # 2 x (0.3512, 0.2297, 0.3227) from [-1, 1] to [0, 255]
    assert latent_preview(torch.zeros(1, 4, 128, 128), "sdxl").size == (384, 384)
