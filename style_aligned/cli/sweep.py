"""`style-aligned sweep`: one set per setting of a grid of StyleAligned options."""

import argparse
import shutil
import sys
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

from style_aligned.cli.options import (
    ProgressBar,
    add_extras_options,
    add_field_options,
    add_model_options,
    add_set_options,
    add_style_options,
    check_files,
    check_for_model,
    check_out,
    given,
    load_model,
    set_values,
)
from style_aligned.evaluation.scoring import CLIP_EXAMPLE, DINO_EXAMPLE
from style_aligned.evaluation.sweep import GRID_HELP, run_sweep, sweep_inputs
from style_aligned.weights.hub import parse_repo_id

if TYPE_CHECKING:
    pass


def add_sweep_command(parser: argparse.ArgumentParser) -> None:
    """Configure `parser` as the `sweep` command (`args.command` is `run_sweep_command`)."""
    from style_aligned.pipeline.spec import SetSpec

    parser.description = (
        "Generate one prompt set per setting of a grid of StyleAligned options, into OUT/NN-<setting>/ (each a set"
        " like generate's), and a labelled OUT/contact-sheet.png (one row per setting). With --clip and --dino,"
        " score the sets and write OUT/sweep.csv, OUT/sweep.md and OUT/sweep.png, a plot of set consistency against"
        " text alignment, one point per setting (the StyleAligned paper's Fig. 6)."
    )
    add_model_options(parser)
    add_set_options(parser)
    add_field_options(parser, SetSpec, ("reference_prompt",))
    group = parser.add_argument_group("sweep")
    group.add_argument(
        "--grid",
        action="append",
        required=True,
        metavar="NAME=V1,V2,...",
        help=GRID_HELP,
    )
    group.add_argument(
        "--score", action="store_true", help=f"score the sets (default scorers: {CLIP_EXAMPLE}, {DINO_EXAMPLE})"
    )
    group.add_argument("--clip", metavar="CLIP", help="score the sets with this CLIP (Hub repo id or folder)")
    group.add_argument("--dino", metavar="DINO", help="score the sets with this DINO (Hub repo id or folder)")
    group.add_argument("--text-until", metavar="SEP", help="score text alignment up to SEP (see evaluate)")
    add_style_options(parser)
    add_extras_options(parser)
    parser.set_defaults(command=run_sweep_command)


def run_sweep_command(args: argparse.Namespace) -> None:
    """Run the `sweep` command: check the grid and the scorers, load the model, sweep, print the table."""
    values = set_values(args) | given(args, ("reference_prompt",))
    spec, settings = sweep_inputs(values, args.grid)  # everything that can be checked before the model is read
    if args.score or args.clip or args.dino:
        args.clip, args.dino = args.clip or CLIP_EXAMPLE, args.dino or DINO_EXAMPLE
    for name in (args.clip, args.dino):
        if name is not None and not Path(name).is_dir() and parse_repo_id(name) is None:
            raise FileNotFoundError(f"the scorer {name} is neither a folder nor a Hub repo id (org/name)")
    for setting in settings:  # each set of the grid, against what the model takes
        check_for_model(args, replace(spec, style=spec.style.replace(**setting)))
    check_out(args.out, {}, args.overwrite)  # a sweep replaces a set or a sweep only with --overwrite
    check_files(args)
    sd = load_model(args)
    if args.overwrite and args.out.is_dir():  # check_out allowed it: the folder holds a sweep or a set
        shutil.rmtree(args.out)
    bar = ProgressBar(f"{len(settings)} settings x {len(spec.image_prompts())} images")
    try:
        result = run_sweep(
            sd,
            spec,
            settings,
            out=args.out,
            progress=bar,
            clip=args.clip,
            dino=args.dino,
            text_until=args.text_until,
            details={"model": str(args.model)},
        )
    finally:
        bar.close()
    if result.markdown is not None:
        print(result.markdown.read_text(), end="")
    print(f"wrote {len(result.folders)} sets and {result.contact_sheet.name} in {args.out}", file=sys.stderr)
    print(args.out)
