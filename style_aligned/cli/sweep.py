"""`style-aligned sweep`: one set per setting of a grid of StyleAligned options."""

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from style_aligned.cli.options import (
    ProgressBar,
    add_extras_options,
    add_model_options,
    add_set_options,
    add_style_options,
    load_model,
    set_fields,
    style_options,
)
from style_aligned.evaluation.sweep import OPTIONS, parse_grid, run_sweep
from style_aligned.options import StyleAlignedOptions

if TYPE_CHECKING:
    from style_aligned.pipeline.generate import SetSpec


def add_sweep_command(parser: argparse.ArgumentParser) -> None:
    """Configure `parser` as the `sweep` command (`args.command` is `run_sweep_command`)."""

    parser.description = (
        "Generate one prompt set per setting of a grid of StyleAligned options, into OUT/NN-<setting>/ (each a set"
        " like generate's), and a labelled OUT/contact-sheet.png (one row per setting). With --clip and --dino,"
        " score the sets and write OUT/sweep.csv, OUT/sweep.md and OUT/sweep.png, a plot of set consistency against"
        " text alignment, one point per setting (the StyleAligned paper's Fig. 6)."
    )
    add_model_options(parser)
    add_set_options(parser)
    parser.add_argument("--reference-prompt", help="prompt of an extra reference image placed first")
    group = parser.add_argument_group("sweep")
    group.add_argument(
        "--grid",
        action="append",
        required=True,
        metavar="NAME=V1,V2,...",
        help=f"an option and its values (repeat; all combinations are generated); NAME: {', '.join(OPTIONS)}",
    )
    group.add_argument("--clip", type=Path, metavar="CLIP_DIR", help="score the sets with this CLIP (with --dino)")
    group.add_argument("--dino", type=Path, metavar="DINO_DIR", help="score the sets with this DINO (with --clip)")
    group.add_argument("--text-until", metavar="SEP", help="score text alignment up to SEP (see evaluate)")
    add_style_options(parser)
    add_extras_options(parser)
    parser.set_defaults(command=run_sweep_command)


def sweep_inputs(args: argparse.Namespace) -> tuple["SetSpec", list[dict[str, Any]]]:
    """The set and the settings of the grid that `sweep` makes from its options.

    Raises:
        ValueError: If the grid is malformed or varies an option also given as a fixed one.
    """
    from style_aligned.pipeline.generate import SetSpec

    settings = parse_grid(args.grid)
    fixed = style_options(args)
    if both := [name for name in settings[0] if name in fixed]:
        raise ValueError(f"{', '.join(both)} given both as a fixed option and in --grid: give each in one place")
    spec = SetSpec(
        **set_fields(args), reference_prompt=args.reference_prompt, style=StyleAlignedOptions().replace(**fixed)
    )
    return spec, settings


def run_sweep_command(args: argparse.Namespace) -> None:
    """Run the `sweep` command: check the grid and the scorers' folders, load the model, sweep, print the table."""
    spec, settings = sweep_inputs(args)
    if (args.clip is None) != (args.dino is None):
        raise ValueError("scoring a sweep needs both --clip and --dino (or neither)")
    for folder in (args.clip, args.dino):
        if folder is not None and not folder.is_dir():
            raise FileNotFoundError(f"the scorer folder {folder} does not exist")
    sd = load_model(args)
    bar = ProgressBar(f"{len(settings)} settings x {len(spec.image_prompts())} images")
    try:
        result = run_sweep(
            sd, spec, settings, args.out, bar, args.clip, args.dino, args.text_until, details={"model": str(args.model)}
        )
    finally:
        bar.close()
    if result.markdown is not None:
        print(result.markdown.read_text(), end="")
    print(f"wrote {len(result.folders)} sets and {result.contact_sheet.name} in {args.out}", file=sys.stderr)
    print(args.out)
