"""Sweep StyleAligned options: one prompt set per setting of a grid, a contact sheet, and, scored, the paper's Fig. 6.

Every setting's set is written like a `generate` set (images, grid.png, set.json), so `style-aligned evaluate` reads
them too. With CLIP and DINO models, each set is scored and the sweep gets a table and a plot of set consistency
against text alignment, one point per setting.
"""

import io
import itertools
import math
import textwrap
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from PIL import Image, ImageDraw, ImageFont

from style_aligned.evaluation.scoring import ClipScorer, DinoScorer, SetScores, evaluate_set, read_set
from style_aligned.evaluation.tables import SCORE_COLUMNS, json_score, markdown_table, score_text, write_csv
from style_aligned.extras import require
from style_aligned.options import option_fields, parse_option

if TYPE_CHECKING:
    from style_aligned.pipeline.model import Model
    from style_aligned.pipeline.progress import Progress, ProgressEvent
    from style_aligned.pipeline.spec import SetSpec

OPTIONS = tuple(option.name for option in option_fields() if not option.many)
"""The StyleAligned options a grid can vary (those that take one value)."""
FLAG_NAMES = {option.flag.removeprefix("--").replace("-", "_"): option.name for option in option_fields()}
"""The options by the name of their flag, where a field names its own flag (`style_strength`: `strength`)."""
GRID_HELP = f"an option and its values (repeat; all combinations are generated); NAME: {', '.join(OPTIONS)}"
"""What a line of a grid holds."""
CONTACT_SHEET, SUMMARY, PLOT = "contact-sheet.png", "sweep.json", "sweep.png"
CSV_TABLE, MARKDOWN_TABLE = "sweep.csv", "sweep.md"
MARGIN = 8


def parse_grid(items: Sequence[str]) -> list[dict[str, Any]]:
    """Parse `NAME=V1,V2,...` items into the settings of their Cartesian product.

    Args:
        items: One item per option: a StyleAligned option (see `OPTIONS`; `-` may stand for `_`, and the name of its
            flag for its own: `style-strength` for `strength`) and its values, numbers or, for a boolean option,
            true/false, on/off, yes/no, 1/0 (see `options.parse_option`).

    Returns:
        One `{name: value}` setting per combination, the first item's values varying slowest.

    Raises:
        ValueError: If an item is malformed, names an unknown option or one given before, or has an empty, invalid
            or repeated value.
    """
    if not items:
        raise ValueError("a sweep needs at least one --grid NAME=V1,V2,... item")
    axes: dict[str, list[bool | int | float | str]] = {}
    for item in items:
        name, separator, values = item.partition("=")
        name = name.strip().replace("-", "_")
        name = FLAG_NAMES.get(name, name)
        if not separator or not name:
            raise ValueError(f"expected NAME=V1,V2,... (e.g. shared_score_shift=0,0.69), got {item!r}")
        if name not in OPTIONS:
            raise ValueError(f"unknown option {name!r} in {item!r}: choose among {', '.join(OPTIONS)}")
        if name in axes:
            raise ValueError(f"{name} is given twice: give all its values in one NAME=V1,V2,... item")
        texts = [text.strip() for text in values.split(",")]
        if not all(texts):
            raise ValueError(f"{item!r} has an empty value: expected {name}=V1,V2,...")
        parsed = [parse_option(name, text) for text in texts]
        if len(set(parsed)) != len(parsed):
            raise ValueError(f"{item!r} repeats a value")
        axes[name] = parsed
    return [dict(zip(axes, values, strict=True)) for values in itertools.product(*axes.values())]


def sweep_inputs(values: Mapping[str, Any], grid: Sequence[str]) -> tuple["SetSpec", list[dict[str, Any]]]:
    """The set of a sweep (its values, see `read_spec`) and the settings of its grid (see `parse_grid`), checked.

    Raises:
        ValueError: If the grid is malformed, varies an option also given as a fixed one, or a value is out of range.
    """
    from style_aligned.pipeline.spec import SetSpec
    from style_aligned.pipeline.spec_fields import read_spec

    settings = parse_grid(grid)
    fixed: Mapping[str, Any] = values.get("style", {})
    if both := [name for name in settings[0] if name in fixed]:
        raise ValueError(f"{', '.join(both)} given both as a fixed option and in --grid: give each in one place")
    spec = read_spec(SetSpec, values)
    spec.check()
    for setting in settings:  # each setting's options, checked with the fixed ones
        spec.style.replace(**setting)
    return spec, settings


def _text(value: Any) -> str:
    if isinstance(value, bool):
        return "on" if value else "off"
    return f"{value:g}" if isinstance(value, float) else str(value)


def setting_label(setting: Mapping[str, Any]) -> str:
    """A setting as text, e.g. `shared_score_shift=0.693147, share_group_norm=on`."""
    return ", ".join(f"{name}={_text(value)}" for name, value in setting.items()) or "defaults"


def contact_sheet(
    rows: Sequence[Sequence[Image.Image]],
    row_labels: Sequence[str],
    column_labels: Sequence[str],
    *,
    max_size: int = 384,
) -> Image.Image:
    """Lay out rows of images on a white sheet, with column labels on top and each row's label above it.

    Images larger than `max_size` are scaled down to fit in it. With `w` x `h` the size of the images on the sheet,
    `f = max(10, min(18, w // 16))` the font size and `s = 2 * (f + 3) + 6` the height of a label (two lines, longer
    labels are cut), the sheet is `8 + columns * (w + 8)` pixels wide and `8 + s + rows * (s + h + 8)` tall.

    Args:
        rows: The rows, each with one image per column, all of one size.
        row_labels: One label per row.
        column_labels: One label per column.
        max_size: The largest width or height of an image on the sheet.

    Returns:
        The contact sheet.

    Raises:
        ValueError: If the rows, columns and labels do not match.
    """
    columns = len(column_labels)
    if not rows or len(rows) != len(row_labels) or any(len(row) != columns for row in rows) or not columns:
        raise ValueError("contact_sheet needs one label per row and per column, and as many images in every row")
    width, height = rows[0][0].size
    scale = min(1.0, max_size / max(width, height))
    width, height = max(1, round(width * scale)), max(1, round(height * scale))
    font_size = max(10, min(18, width // 16))
    font = ImageFont.load_default(size=font_size)
    strip = 2 * (font_size + 3) + 6
    sheet_width = MARGIN + columns * (width + MARGIN)
    sheet = Image.new("RGB", (sheet_width, MARGIN + strip + len(rows) * (strip + height + MARGIN)), "white")
    draw = ImageDraw.Draw(sheet)

    def label(text: str, x: int, y: int, room: int) -> None:
        lines = textwrap.wrap(text, max(8, int(room / (font_size * 0.55))), max_lines=2, placeholder=" ...")
        for number, line in enumerate(lines):
            draw.text((x, y + 3 + number * (font_size + 3)), line, fill="black", font=font)

    for column, text in enumerate(column_labels):
        label(text, MARGIN + column * (width + MARGIN), MARGIN, width)
    for row, (images, text) in enumerate(zip(rows, row_labels, strict=True)):
        y = MARGIN + strip + row * (strip + height + MARGIN)
        label(text, MARGIN, y, sheet_width - 2 * MARGIN)
        for column, image in enumerate(images):
            cell = image.convert("RGB").resize((width, height), Image.Resampling.LANCZOS)
            sheet.paste(cell, (MARGIN + column * (width + MARGIN), y + strip))
    return sheet


def plot_consistency(points: Sequence[tuple[str, float, float]], path: Path) -> None:
    """Write a PNG of set consistency (y) against text alignment (x), one numbered point per setting, with a key.

    The figure is 640 pixels wide and `420 + 20 * len(points)` tall.

    Args:
        points: `(label, text alignment, consistency)` per setting; points with a NaN are listed but not drawn.
        path: The PNG file.

    Raises:
        MissingExtraError: If matplotlib is not installed.
    """
    from style_aligned.pipeline.images import save_png

    figure_module = require("matplotlib.figure", extra="eval", feature="the sweep plot")
    pixels = 420 + 20 * len(points)
    figure: Any = figure_module.Figure(
        figsize=(6.4, pixels / 100), dpi=100
    )  # matplotlib's stubs leave **kwargs untyped
    key = 20 + 20 * len(points)
    axes: Any = figure.add_axes((0.12, (key + 60) / pixels, 0.83, 300 / pixels))
    for number, (_, alignment, consistency) in enumerate(points, start=1):
        if not (math.isnan(alignment) or math.isnan(consistency)):
            axes.scatter([alignment], [consistency], s=36, zorder=2)
            axes.annotate(str(number), (alignment, consistency), xytext=(5, 4), textcoords="offset points")
    axes.set_xlabel("text alignment (CLIP)")
    axes.set_ylabel("set consistency (DINO)")
    axes.set_title("consistency against text alignment, one point per setting")
    axes.grid(True, alpha=0.3)
    lines = [f"{number}: {label}" for number, (label, *_) in enumerate(points, start=1)]
    figure.text(0.02, key / pixels, "\n".join(lines), va="top", fontsize=8, linespacing=1.6)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    save_png(Image.open(buffer), path)


@dataclass(frozen=True, kw_only=True)
class SweepResult:
    """What a sweep wrote: a set folder per setting, the contact sheet, and, when scored, the table and plot.

    Attributes:
        settings: The options of each setting, in order.
        labels: Each setting as text (see `setting_label`).
        folders: The set folder of each setting.
        contact_sheet: The contact sheet.
        scores: The scores of each setting's set (`name` is its label), when scored.
        csv: The CSV table, when scored.
        markdown: The Markdown table, when scored.
        plot: The consistency-text alignment plot, when scored.
    """

    settings: list[dict[str, Any]]
    labels: list[str]
    folders: list[Path]
    contact_sheet: Path
    scores: list[SetScores] | None = None
    csv: Path | None = None
    markdown: Path | None = None
    plot: Path | None = None


def _offset(progress: "Progress | None", index: int, count: int) -> "Progress | None":
    if progress is None:
        return None

    def report(event: "ProgressEvent") -> None:
        progress(replace(event, done=index * event.total + event.done, total=count * event.total))

    return report


def _tables(settings: list[dict[str, Any]], scores: list[SetScores], csv_path: Path) -> str:
    names = list(dict.fromkeys(name for setting in settings for name in setting))
    numbered = list(enumerate(zip(settings, scores, strict=True), start=1))
    csv_rows = [
        [number, *[setting.get(name, "") for name in names], row.images, row.text_alignment, row.consistency, row.path]
        for number, (setting, row) in numbered
    ]
    write_csv(csv_path, ["setting", *names, "images", "text_alignment", "dino_consistency", "path"], csv_rows)
    rows = [
        [number, *[_text(setting[name]) if name in setting else "" for name in names]]
        + [score_text(row.text_alignment), score_text(row.consistency)]
        for number, (setting, row) in numbered
    ]
    return markdown_table(["#", *names, *SCORE_COLUMNS], [True, *[False] * len(names), True, True], rows)


def _sweep_set(
    sd: "Model",
    spec: "SetSpec",
    folder: Path,
    *,
    sweep: dict[str, Any],
    details: dict[str, Any],
    progress: "Progress | None",
) -> list[Image.Image]:
    """Make one setting's set in its folder, as `generate` writes it (see `SetFolder`); returns its images."""
    from style_aligned.pipeline.generate import generate_set
    from style_aligned.pipeline.model import kind_of
    from style_aligned.pipeline.set_files import SetFolder, make_set, set_request, sidecar

    asked = set_request("generate", spec, **details, sweep=sweep)
    files = sidecar("generate", spec, spec.image_prompts(), **details, backbone=kind_of(sd), sweep=sweep, request=asked)
    set_folder = SetFolder(folder, files, title=f"{sweep['label']}, seed {spec.seed}")
    make_set(
        set_folder,
        spec.plan(),
        lambda images, report: generate_set(sd, spec, progress=report, images=images),
        progress=progress,
    )
    return [Image.open(folder / name) for name in set_folder.names]


def _scorers(
    clip: Path | str | None, dino: Path | str | None, *, images: int, device: "torch.device"
) -> "tuple[ClipScorer, DinoScorer] | None":
    """The scorers of a sweep (none without `clip` and `dino`), checked before any set is made."""
    if (clip is None) != (dino is None):
        raise ValueError("scoring a sweep needs both a CLIP and a DINO folder (--clip and --dino), or neither")
    if clip is None or dino is None:
        return None
    if images < 2:
        raise ValueError("set consistency needs at least two images per set: give more prompts")
    return ClipScorer(clip, device), DinoScorer(dino, device)


def _score(
    result: SweepResult,
    scorers: "tuple[ClipScorer, DinoScorer]",
    entries: list[dict[str, Any]],
    *,
    text_until: str | None,
) -> list[SetScores]:
    """Score a sweep's sets: the table (CSV and Markdown) and the plot beside them; the scores go into `entries`."""
    out = result.contact_sheet.parent
    pairs = list(zip(result.folders, result.labels, strict=True))
    scores = [evaluate_set(read_set(folder), *scorers, name=label, text_until=text_until) for folder, label in pairs]
    (out / MARKDOWN_TABLE).write_text(_tables(result.settings, scores, out / CSV_TABLE))
    plot_consistency([(row.name, row.text_alignment, row.consistency) for row in scores], out / PLOT)
    for entry, row in zip(entries, scores, strict=True):
        entry.update(text_alignment=json_score(row.text_alignment), dino_consistency=json_score(row.consistency))
    return scores


def run_sweep(
    sd: "Model",
    spec: "SetSpec",
    settings: Sequence[Mapping[str, Any]],
    *,
    out: Path,
    progress: "Progress | None" = None,
    clip: Path | str | None = None,
    dino: Path | str | None = None,
    text_until: str | None = None,
    details: Mapping[str, Any] | None = None,
) -> SweepResult:
    """Generate `spec`'s set once per setting into `out/NN-<setting>/`, then the contact sheet, table and plot.

    Every setting is checked, and the scorers loaded, before the first set is generated. Each set is written as
    `generate` writes it (`SetFolder`), its sidecar recording the setting. `out/sweep.json` lists the settings (and
    their scores, once scored).

    Args:
        sd: The model: a Stable Diffusion pipeline or FLUX.1's models (see `style_aligned.weights.families`).
        spec: The set; its `style` holds the options that every setting shares.
        settings: The `StyleAlignedAdapter` options of each set (e.g. from `parse_grid`), over `spec.style`.
        out: The output folder.
        progress: Called as the work proceeds, over the whole sweep.
        clip: A CLIP folder or Hub repo id to score the sets (with `dino`), see `evaluation.ClipScorer`.
        dino: A DINO folder or Hub repo id, see `evaluation.DinoScorer`.
        text_until: See `evaluation.evaluate_set`.
        details: More fields for the sidecars (e.g. the model's path).

    Returns:
        What was written.

    Raises:
        ValueError: If there is no setting, an option is out of range, only one of `clip` and `dino` is given, or
            a scored set has fewer than two images.
        FileNotFoundError: If a scorer's folder is missing.
    """
    from style_aligned.adapters.style_aligned_adapter import StyleAlignedAdapter
    from style_aligned.pipeline.backbone import backbone_of
    from style_aligned.pipeline.images import save_png
    from style_aligned.pipeline.set_files import sidecar, write_json

    plain = [dict(setting) for setting in settings]
    if not plain:
        raise ValueError("a sweep needs at least one setting")
    spec = spec.resolved(sd)
    specs = [replace(spec, style=spec.style.replace(**setting)).resolved(sd) for setting in plain]
    backbone = backbone_of(sd)
    for setting_spec in specs:
        StyleAlignedAdapter(backbone.target, setting_spec.style)  # checks the layers; nothing changes until injected
    prompts = spec.image_prompts()
    scorers = _scorers(clip, dino, images=len(prompts), device=backbone.device)
    labels = [setting_label(setting) for setting in plain]
    folders = [out / f"{number:02d}-{label.replace(', ', ',')}" for number, label in enumerate(labels, start=1)]
    summary = {
        k: v for k, v in sidecar("sweep", spec, prompts, **(details or {})).items() if k not in ("images", "grid")
    }
    entries: list[dict[str, Any]] = [
        {"setting": setting, "label": label, "folder": folder.name}
        for setting, label, folder in zip(plain, labels, folders, strict=True)
    ]
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / SUMMARY, summary | {"settings": entries, "contact_sheet": CONTACT_SHEET})
    rows: list[list[Image.Image]] = []
    for index, (setting_spec, entry, folder) in enumerate(zip(specs, entries, folders, strict=True)):
        sweep, report = {"index": index + 1, "count": len(specs), **entry}, _offset(progress, index, len(specs))
        rows.append(_sweep_set(sd, setting_spec, folder, sweep=sweep, details=dict(details or {}), progress=report))
    columns = [f"reference: {prompts[0]}", *prompts[1:]]
    save_png(contact_sheet(rows, [f"{n}. {label}" for n, label in enumerate(labels, 1)], columns), out / CONTACT_SHEET)
    result = SweepResult(settings=plain, labels=labels, folders=folders, contact_sheet=out / CONTACT_SHEET)
    if scorers is None:
        return result
    scores = _score(result, scorers, entries, text_until=text_until)
    write_json(
        out / SUMMARY, summary | {"settings": entries, "contact_sheet": CONTACT_SHEET, "table": CSV_TABLE, "plot": PLOT}
    )
    return replace(result, scores=scores, csv=out / CSV_TABLE, markdown=out / MARKDOWN_TABLE, plot=out / PLOT)
