"""The page's settings come from the specs' fields and give the specs the commands make (no model, no browser)."""

from pathlib import Path

import pytest

from style_aligned.app.forms import (
    SET_CONTROLS,
    STYLE_CONTROLS,
    TRANSFER_CONTROLS,
    control,
    lora_values,
    prompt_lines,
    spec_values,
)
from style_aligned.cli import build_parser
from style_aligned.cli.generate import generate_spec
from style_aligned.options import StyleAlignedOptions, option_fields
from style_aligned.pipeline.spec import SetSpec
from style_aligned.pipeline.spec_fields import read_spec, spec_fields
from style_aligned.pipeline.transfer import TransferSpec


def test_every_style_option_is_on_the_page_with_its_own_help() -> None:
    assert STYLE_CONTROLS == StyleAlignedOptions.names()
    for option in option_fields():
        setting = control("generate", option.name)
        assert setting.help == option.help == StyleAlignedOptions.help(option.name)
    kinds = {name: control("generate", name).kind for name in STYLE_CONTROLS}
    assert kinds["adain_queries"] == kinds["share_group_norm"] == "switch"
    assert kinds["shared_score_shift"] == "float" and kinds["shared_layers"] == "list"
    assert kinds["shared_blocks"] == "choices" and control("generate", "shared_blocks").choices == (
        "down",
        "mid",
        "up",
        "double",
        "single",
    )


def test_set_and_transfer_settings_read_the_specs_fields() -> None:
    helps = {name: control("generate", name).help for name in SET_CONTROLS}
    assert all(helps.values()), helps
    fields = spec_fields(SetSpec)
    assert helps["chunk_size"] == fields["chunk_size"].help == "targets per batch (default: all)"
    assert control("generate", "steps").default is fields["steps"].default is None  # left to the model kind
    assert control("transfer", "offset").default is spec_fields(TransferSpec)["offset"].default is None  # per kind
    assert control("transfer", "fit").kind == "choice" and control("transfer", "fit").choices == ("crop", "resize")
    assert all(control("transfer", name).help for name in TRANSFER_CONTROLS)
    assert all(control("generate", name).default is None for name in STYLE_CONTROLS)  # left to the spec's style


def test_page_values_give_the_commands_spec() -> None:
    values = {
        "steps": 2.0,
        "size": "64x64",
        "seed": 3,
        "guidance": None,
        "chunk_size": None,
        "shared_score_shift": 0.5,
        "share_group_norm": "off",
        "adain_values": "default",
        "shared_blocks": ["up"],
        "shared_layers": "",
        "offset": 4,  # not a field of a generated set: left out
    }
    page = spec_values("generate", values, prompts=["a", "b"])
    typed = build_parser().parse_args(
        ["generate", "--model", "models/sd1", "--out", "x", "--prompt", "a", "--prompt", "b", "--steps", "2"]
        + ["--size", "64x64", "--seed", "3", "--shared-score-shift", "0.5", "--no-share-group-norm"]
        + ["--shared-blocks", "up"]
    )
    assert read_spec(SetSpec, page) == generate_spec(typed)
    assert "offset" not in page and page["steps"] == 2 and isinstance(page["steps"], int)


@pytest.mark.parametrize(
    ("name", "value", "message"),
    [
        ("size", "sixty", "size: expected WIDTHxHEIGHT"),
        ("steps", 2.5, "steps: expected a whole number"),
        ("shared_layers", "1, x", "shared layers: invalid literal"),
        ("share_group_norm", "maybe", "share group norm: choose one of default, on, off"),
        ("shared_blocks", ["top"], "shared blocks: unknown top"),
    ],
)
def test_bad_values_name_their_setting(name: str, value: object, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        spec_values("generate", {name: value})


def test_prompts_are_the_non_empty_lines() -> None:
    assert prompt_lines(" a toy train \n\n  \na toy car") == ["a toy train", "a toy car"]
    assert prompt_lines(None) == []


def test_loras_are_files_of_the_lora_folder_or_hub_files(tmp_path: Path) -> None:
    folder = tmp_path / "loras"
    (folder / "styles").mkdir(parents=True)
    (folder / "styles" / "ink.safetensors").write_bytes(b"")
    (tmp_path / "secret.safetensors").write_bytes(b"")
    ink = str(folder / "styles/ink.safetensors")
    assert lora_values("styles/ink.safetensors:0.5\n", folder) == [{"path": ink, "scale": 0.5}]
    assert lora_values("styles/ink.safetensors", folder) == [{"path": ink, "scale": 1.0}]
    for outside in ("../secret.safetensors", str(tmp_path / "secret.safetensors"), "missing.safetensors"):
        with pytest.raises(ValueError, match="is neither a file in the LoRA folder"):
            lora_values(outside, folder)
    with pytest.raises(ValueError, match="scale after ':' must be a number"):
        lora_values("styles/ink.safetensors:strong", folder)
    with pytest.raises(ValueError, match="neither a file in --lora-dir nor a Hub file"):
        lora_values("styles/ink.safetensors", None)
    assert lora_values("", None) == []
    hub = "ByteDance/SDXL-Lightning/sdxl_lightning_4step_lora.safetensors"
    assert lora_values(f"{hub}:0.8", None) == [{"path": hub, "scale": 0.8}]  # fetched into the Hub cache
    assert lora_values(hub, folder) == [{"path": hub, "scale": 1.0}]
    spec = read_spec(SetSpec, {"prompts": ["a"], "loras": lora_values(f"{hub}:0.8", None)})
    assert [(str(lora.path), lora.scale) for lora in spec.loras] == [(hub, 0.8)]


def test_strength_is_a_slider_from_zero_to_one() -> None:
    strength = control("generate", "strength")
    assert (strength.kind, strength.bounds, strength.initial, strength.default) == ("slider", (0.0, 1.0), 1.0, None)
    assert strength.help == StyleAlignedOptions.help("strength")
    assert strength.parse(1.0) is None  # left where it starts: left to the spec (and free for a sweep's grid)
    assert strength.parse(0.35) == 0.35 and strength.parse(0) == 0.0
    for bad in (1.5, -0.1, "nan"):
        with pytest.raises(ValueError, match=r"strength: expected a number in \[0, 1\]"):
            strength.parse(bad)
    page = spec_values("generate", {"strength": 0.35, "steps": 2}, prompts=["a", "b"])
    typed = build_parser().parse_args(
        ["generate", "--model", "m", "--out", "x", "--prompt", "a", "--prompt", "b", "--steps", "2"]
        + ["--style-strength", "0.35"]
    )
    assert read_spec(SetSpec, page) == generate_spec(typed)
    assert read_spec(SetSpec, page).style.strength == 0.35
    assert "style" not in spec_values("generate", {"strength": 1.0})


def test_the_page_shows_the_strength_as_a_slider() -> None:
    gr = pytest.importorskip("gradio")
    from style_aligned.app.page import widget

    with gr.Blocks():
        slider = widget(control("generate", "strength"))
        other = widget(control("generate", "only_self_level"))
    assert isinstance(slider, gr.Slider) and not isinstance(other, gr.Slider)
    assert (slider.minimum, slider.maximum, slider.value, slider.step) == (0.0, 1.0, 1.0, 0.01)
    assert slider.label == "strength" and slider.info == StyleAlignedOptions.help("strength")
