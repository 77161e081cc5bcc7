"""The sweep command: grid parsing, and a sweep of the random SD1 model scored by small random CLIP and DINO models."""

import csv
import gc
import json
import math
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from style_aligned.cli import main as cli
from style_aligned.evaluation.scoring import read_set
from style_aligned.evaluation.sweep import contact_sheet, parse_grid, run_sweep, setting_label
from style_aligned.options import StyleAlignedOptions
from style_aligned.pipeline.progress import ProgressEvent
from style_aligned.pipeline.spec import SetSpec
from style_aligned.weights.loading import load_pipeline

PROMPTS = ["a toy train. watercolor", "a red bicycle. watercolor"]


def test_grid_is_the_product_in_the_given_order() -> None:
    settings = parse_grid(["shared-score-shift=0, 0.5", "share_group_norm=on,off", "only_self_level=0.25"])
    assert settings == [
        {"shared_score_shift": 0.0, "share_group_norm": True, "only_self_level": 0.25},
        {"shared_score_shift": 0.0, "share_group_norm": False, "only_self_level": 0.25},
        {"shared_score_shift": 0.5, "share_group_norm": True, "only_self_level": 0.25},
        {"shared_score_shift": 0.5, "share_group_norm": False, "only_self_level": 0.25},
    ]
    assert [type(value) for value in settings[0].values()] == [float, bool, float]
    booleans = ["true", "FALSE", "On", "off", "yes", "no", "1", "0"]
    for text, value in zip(booleans, [True, False] * 4, strict=True):
        assert parse_grid([f"full-attention-share={text}"]) == [{"full_attention_share": value}]
    assert setting_label(settings[2]) == "shared_score_shift=0.5, share_group_norm=on, only_self_level=0.25"
    assert setting_label({"shared_score_scale": 0.6931471805599453}) == "shared_score_scale=0.693147"


@pytest.mark.parametrize(
    ("items", "message"),
    [
        ([], "at least one --grid"),
        (["shared_score_scale"], "expected NAME=V1,V2"),
        (["=1,2"], "expected NAME=V1,V2"),
        (["guidance=5,7"], "unknown option 'guidance'.*choose among strength, adain_queries"),
        (["classifier_free_guidance=off"], "unknown option"),
        (["shared_score_scale=1", "shared-score-scale=2"], "shared_score_scale is given twice"),
        (["shared_score_scale="], "has an empty value"),
        (["shared_score_scale=1,,2"], "has an empty value"),
        (["shared_score_scale=1,a"], "shared_score_scale takes numbers, got 'a'"),
        (["shared_score_shift=nan"], "takes finite numbers"),
        (["share_group_norm=maybe"], "share_group_norm takes true/false"),
        (["share_group_norm=on,1"], "repeats a value"),
        (["only_self_level=0.5,.5"], "repeats a value"),
    ],
)
def test_grid_errors(items: list[str], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_grid(items)


def test_contact_sheet_size() -> None:
    rows = [[Image.new("RGB", (96, 64), (10 * row, 20 * column, 0)) for column in range(3)] for row in range(2)]
    sheet = contact_sheet(rows, ["one", "two " * 40], ["a", "b", "c"])
    strip = 2 * (10 + 3) + 6
    assert sheet.size == (8 + 3 * (96 + 8), 8 + strip + 2 * (strip + 64 + 8))
    assert sheet.getpixel((8 + 2 * 104 + 40, 8 + 3 * strip + 64 + 8 + 30)) == (10, 40, 0)  # row 2, column 3
    large = contact_sheet([[Image.new("RGB", (1024, 512))]], ["row"], ["column"])
    assert large.size == (8 + 384 + 8, 8 + 2 * (2 * (18 + 3) + 6) + 192 + 8)  # scaled down to 384 px
    with pytest.raises(ValueError, match="one label per row"):
        contact_sheet(rows, ["one"], ["a", "b", "c"])


def sweep_files(out: Path, rows: int, columns: int, options: list[str]) -> list[dict[str, str]]:
    """Check what a scored sweep of 64x64 px sets wrote; return its CSV rows."""
    sheet = Image.open(out / "contact-sheet.png")
    strip = 2 * (10 + 3) + 6
    assert sheet.size == (8 + columns * (64 + 8), 8 + strip + rows * (strip + 64 + 8))
    plot = Image.open(out / "sweep.png")
    plot.load()
    assert plot.size == (640, 420 + 20 * rows)
    summary = json.loads((out / "sweep.json").read_text())
    assert (summary["command"], summary["contact_sheet"], summary["plot"]) == (
        "sweep",
        "contact-sheet.png",
        "sweep.png",
    )
    with open(out / "sweep.csv", newline="") as file:
        table = list(csv.DictReader(file))
    assert len(table) == len(summary["settings"]) == rows
    assert list(table[0]) == ["setting", *options, "images", "text_alignment", "dino_consistency", "path"]
    markdown = (out / "sweep.md").read_text().splitlines()
    assert markdown[0] == f"| # | {' | '.join(options)} | text alignment (CLIP) | set consistency (DINO) |"
    assert len(markdown) == 2 + rows
    for number, (row, entry) in enumerate(zip(table, summary["settings"], strict=True), start=1):
        folder = out / entry["folder"]
        assert Path(row["path"]) == folder and folder.name.startswith(f"{number:02d}-")
        files = read_set(folder)  # readable by evaluate
        assert len(files.images) == columns and files.command == "generate"
        assert all(Image.open(path).size == (64, 64) for path in files.images)
        sidecar = json.loads((folder / "set.json").read_text())
        assert sidecar["sweep"]["setting"] == entry["setting"]
        assert sidecar["style"].items() >= entry["setting"].items()
        assert (sidecar["steps"], sidecar["width"], sidecar["height"]) == (2, 64, 64)
        assert int(row["images"]) == columns
        assert math.isfinite(float(row["text_alignment"])) and math.isfinite(float(row["dino_consistency"]))
        assert entry["text_alignment"] == pytest.approx(float(row["text_alignment"]))
        assert markdown[1 + number].startswith(f"| {number} | ")
    return table


@pytest.fixture(scope="module")
def scorers(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    pytest.importorskip("transformers")
    from tests.helpers.random_scorers import save_random_scorers

    return save_random_scorers(tmp_path_factory.mktemp("scorers"))


def test_sd1_sweep(sd1_converted: Path, scorers: tuple[Path, Path], tmp_path: Path, capsys: Any) -> None:
    out = tmp_path / "sweep"
    common = ["--model", str(sd1_converted), "--device", "cpu", "--steps", "2", "--size", "64", "--seed", "3"]
    prompts = [argument for prompt in PROMPTS for argument in ("--prompt", prompt)]
    clip, dino = scorers
    grid = ["--grid", "shared-score-shift=0,1.5", "--grid", "share_group_norm=off,on"]
    scoring = ["--clip", str(clip), "--dino", str(dino), "--text-until", "."]
    cli(["sweep", *common, *prompts, *grid, *scoring, "--adain-values", "--out", str(out)])
    table = sweep_files(out, rows=4, columns=2, options=["shared_score_shift", "share_group_norm"])
    assert [(row["shared_score_shift"], row["share_group_norm"]) for row in table] == [
        ("0.0", "False"),
        ("0.0", "True"),
        ("1.5", "False"),
        ("1.5", "True"),
    ]
    assert capsys.readouterr().out == (out / "sweep.md").read_text() + f"{out}\n"
    folders = [Path(row["path"]) for row in table]
    assert folders[3].name == "04-shared_score_shift=1.5,share_group_norm=on"
    assert json.loads((folders[3] / "set.json").read_text())["style"] == (
        StyleAlignedOptions(adain_values=True, shared_score_shift=1.5, share_group_norm=True).resolved("sd1").to_dict()
    )

    different = [Image.open(read_set(folder).images[1]).tobytes() for folder in folders]
    assert len(set(different)) == 4  # each setting changes the target


@pytest.fixture(scope="module")
def sd(sd1_converted: Path) -> Iterator[Any]:
    gc.collect()  # the models loaded by earlier commands
    yield load_pipeline(sd1_converted)
    gc.collect()


def test_unscored_sweep_api(sd: Any, tmp_path: Path) -> None:
    events: list[ProgressEvent] = []
    spec = SetSpec(prompts=[PROMPTS[0]], steps=1, width=64, height=64, style=StyleAlignedOptions(adain_values=True))
    result = run_sweep(
        sd, spec, parse_grid(["only-self-level=0,1"]), out=tmp_path, progress=events.append, details={"model": "m"}
    )
    assert result.labels == ["only_self_level=0", "only_self_level=1"]
    assert result.scores is None and result.csv is None and result.plot is None
    assert sorted(path.name for path in tmp_path.iterdir()) == [
        "01-only_self_level=0",
        "02-only_self_level=1",
        "contact-sheet.png",
        "sweep.json",
    ]
    assert Image.open(result.contact_sheet).size == (8 + 64 + 8, 8 + 32 + 2 * (32 + 64 + 8))
    sidecar = json.loads((result.folders[1] / "set.json").read_text())
    expected = (
        StyleAlignedOptions(adain_values=True, only_self_level=1.0, share_group_norm=True).resolved("sd1").to_dict()
    )
    assert (sidecar["model"], sidecar["style"]) == ("m", expected)  # every effective option, SD1's shared GroupNorm
    per_set = 1 + 1  # one step of the reference (no target), then one image to decode
    assert [event.done for event in events] == list(range(1, 2 * per_set + 1))
    assert {event.total for event in events} == {2 * per_set}


def test_a_strength_sweep_goes_from_the_plain_model_to_the_method(sd: Any, tmp_path: Path) -> None:
    spec = SetSpec(prompts=PROMPTS, steps=2, width=64, height=64, seed=5)
    result = run_sweep(sd, spec, parse_grid(["style-strength=0,0.5,1"]), out=tmp_path / "sweep")
    assert result.labels == ["strength=0", "strength=0.5", "strength=1"]
    assert Image.open(result.contact_sheet).size == (8 + 2 * (64 + 8), 8 + 32 + 3 * (32 + 64 + 8))
    assert [json.loads((folder / "set.json").read_text())["style"]["strength"] for folder in result.folders] == [
        0.0,
        0.5,
        1.0,
    ]
    plain_and_method = [{"only_self_level": 1.0, "share_group_norm": False}, {}]  # no layer shared, and the defaults
    ends = run_sweep(sd, spec, plain_and_method, out=tmp_path / "ends")

    def images(folder: Path) -> list[bytes]:
        return [Image.open(path).tobytes() for path in read_set(folder).images]

    zero, half, one = (images(folder) for folder in result.folders)
    plain, method = (images(folder) for folder in ends.folders)
    assert zero == plain and one == method  # pixel for pixel
    assert zero[0] == half[0] == one[0]  # the reference is never changed
    assert half[1] not in (zero[1], one[1])


def test_interrupted_sweep_keeps_finished_sets(sd: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import style_aligned.pipeline.generate as generate

    calls: list[int] = []
    generate_set = generate.generate_set

    def interrupted_second_time(*args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return generate_set(*args, **kwargs)

    monkeypatch.setattr(generate, "generate_set", interrupted_second_time)
    spec = SetSpec(prompts=[PROMPTS[0]], steps=1, width=64, height=64)
    with pytest.raises(KeyboardInterrupt):
        run_sweep(sd, spec, parse_grid(["adain_values=off,on"]), out=tmp_path)
    first, second = tmp_path / "01-adain_values=off", tmp_path / "02-adain_values=on"
    assert len(read_set(first).images) == 1
    assert sorted(path.name for path in second.iterdir()) == ["set.json"]  # reported incomplete by evaluate
    assert not (tmp_path / "contact-sheet.png").exists()


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ([{"only_self_level": 0.0}, {"only_self_level": 2.0}], r"only_self_level must be in \[0, 1\], got 2.0"),
        ([{"shared_score_scale": 0.0}], "shared_score_scale must be a finite number > 0"),
        ([{"full_attention_share": True, "shared_score_shift": 1.0}], "no effect with full_attention_share"),
        ([], "at least one setting"),
    ],
)
def test_settings_are_checked_first(sd: Any, settings: list[dict[str, Any]], message: str, tmp_path: Path) -> None:
    spec = SetSpec(prompts=PROMPTS, steps=2, width=64, height=64)
    with pytest.raises(ValueError, match=message):
        run_sweep(sd, spec, settings, out=tmp_path / "sweep")
    with pytest.raises(ValueError, match="set consistency needs at least two images"):
        run_sweep(sd, replace(spec, prompts=PROMPTS[:1]), [{}], out=tmp_path / "sweep", clip=tmp_path, dino=tmp_path)
    assert not (tmp_path / "sweep").exists()


def test_command_errors(scorers: tuple[Path, Path], tmp_path: Path, capsys: Any) -> None:
    """Errors found before the model is loaded."""
    out = tmp_path / "sweep"
    common = ["sweep", "--model", str(tmp_path / "no-model"), "--prompt", PROMPTS[0], "--out", str(out)]
    cases = [
        (["--grid", "shared_scale=1,2"], "unknown option 'shared_scale'"),
        (["--grid", "shared_score_shift=0,1", "--shared-score-shift", "1"], "shared_score_shift given both"),
        (["--grid", "shared_score_shift=0,1", "--clip", str(scorers[0])], "no-model is neither a folder"),
        (["--grid", "shared_score_shift=0,1", "--clip", "a", "--dino", "b"], "the scorer a is neither a folder nor"),
    ]
    for arguments, message in cases:
        with pytest.raises(SystemExit) as exit_info:
            cli([*common, *arguments])
        assert exit_info.value.code == 2
        assert message in capsys.readouterr().err
    assert not out.exists()
