"""`StyleAlignedOptions`: defaults per model kind, checks, the command line and sidecars derived from it."""

import argparse
import math
from typing import Any

import pytest

from style_aligned import StyleAlignedOptions
from style_aligned.cli.options import add_style_options, style_options
from style_aligned.evaluation.sweep import OPTIONS, parse_grid
from style_aligned.options import option_fields, parse_option


def test_defaults_follow_the_reference_examples_per_model() -> None:
    assert StyleAlignedOptions().resolved("sd1").share_group_norm is True
    assert StyleAlignedOptions().resolved("sdxl").share_group_norm is False
    assert StyleAlignedOptions(share_group_norm=False).resolved("sd1").share_group_norm is False
    transfer = StyleAlignedOptions.for_transfer()
    assert transfer.share_group_norm is True and transfer.shared_score_shift == pytest.approx(math.log(2))


@pytest.mark.parametrize(
    "options",
    [
        {"shared_score_scale": 0.0},
        {"shared_score_scale": -1.0},
        {"shared_score_scale": math.nan},
        {"shared_score_shift": math.inf},
        {"only_self_level": 1.5},
        {"shared_layers": [-1]},
        {"shared_blocks": ["down", "left"]},
        {"only_self_level": 0.5, "shared_blocks": ["up"]},
        {"shared_layers": [1], "shared_blocks": ["up"]},
        {"full_attention_share": True, "shared_score_shift": 1.0},
        {"full_attention_share": True, "shared_score_scale": 0.5},
        {"strength": 1.5},
        {"strength": -0.5},
        {"strength": math.nan},
        {"full_attention_share": True, "strength": 0.5},
        {"attention_mode": "swap", "strength": 0.0},
    ],
)
def test_bad_options_name_themselves(options: dict[str, Any]) -> None:
    with pytest.raises(ValueError) as error:
        StyleAlignedOptions(**options)
    assert any(name in str(error.value) for name in options)


def test_unknown_options_are_named() -> None:
    with pytest.raises(ValueError, match="unknown StyleAligned option 'adain_everything'"):
        StyleAlignedOptions.from_dict({"adain_everything": True})
    with pytest.raises(ValueError, match="unknown StyleAligned option 'shift'"):
        StyleAlignedOptions().replace(shift=1.0)
    with pytest.raises(ValueError, match="unknown option 'shift'"):
        parse_grid(["shift=0,1"])


def test_sidecar_round_trip() -> None:
    options = StyleAlignedOptions(shared_layers=(3, 1), adain_values=True).resolved("sdxl")
    data = options.to_dict()
    assert data["shared_layers"] == [3, 1] and set(data) == set(StyleAlignedOptions.names())
    assert StyleAlignedOptions.from_dict(data) == options


def test_command_line_flags_are_the_fields() -> None:
    parser = argparse.ArgumentParser()
    add_style_options(parser)
    flags = {action.dest for action in parser._actions if action.dest != "help"}  # pyright: ignore[reportPrivateUsage]
    assert flags == set(StyleAlignedOptions.names())
    args = parser.parse_args(["--no-adain-keys", "--shared-score-shift", "0.5", "--shared-blocks", "up", "mid"])
    assert style_options(args) == {"adain_keys": False, "shared_score_shift": 0.5, "shared_blocks": ["up", "mid"]}
    options = StyleAlignedOptions.from_dict(style_options(args))
    assert options.shared_blocks == ("up", "mid")
    help_text = parser.format_help().replace("\n", " ")
    for option in option_fields():
        assert option.help.split()[0] in help_text


def test_sweep_grid_takes_the_single_valued_options() -> None:
    assert set(OPTIONS) == {option.name for option in option_fields() if not option.many}
    assert parse_option("share_group_norm", "on") is True
    assert parse_option("only_self_level", "0.3") == 0.3
    with pytest.raises(ValueError, match="takes a list"):
        parse_option("shared_layers", "1")


def test_strength_is_the_style_strength_flag() -> None:
    parser = argparse.ArgumentParser()
    add_style_options(parser)
    assert style_options(parser.parse_args(["--style-strength", "0.4"])) == {"strength": 0.4}
    assert StyleAlignedOptions.from_dict(style_options(parser.parse_args([]))).strength == 1.0
    strength = next(option for option in option_fields() if option.name == "strength")
    assert (strength.flag, strength.bounds, strength.default) == ("--style-strength", (0.0, 1.0), 1.0)
    assert next(option for option in option_fields() if option.name == "adain_values").flag == "--adain-values"
    flags = [string for action in parser._actions for string in action.option_strings]  # pyright: ignore[reportPrivateUsage]
    assert "--style-strength" in flags and "--strength" not in flags
    help_text = parser.format_help()
    assert "--style-strength STRENGTH" in help_text
    assert (
        parse_grid(["style-strength=0,0.5,1"])
        == parse_grid(["strength=0,0.5,1"])
        == [
            {"strength": 0.0},
            {"strength": 0.5},
            {"strength": 1.0},
        ]
    )
