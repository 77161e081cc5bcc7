"""`style-aligned generate`: a style-consistent set from prompts."""

import argparse
from typing import TYPE_CHECKING

from style_aligned.cli.options import (
    add_extras_options,
    add_model_options,
    add_set_options,
    add_style_options,
    default_help,
    given,
    load_for_set,
    set_values,
    write_set,
)

if TYPE_CHECKING:
    from style_aligned.pipeline.spec import SetSpec


def generate_spec(args: argparse.Namespace) -> "SetSpec":
    """The set that `generate` makes from its options, with everything checked that can be without the model.

    Raises:
        ValueError: If an option is out of range.
    """
    from style_aligned.pipeline.spec import SetSpec
    from style_aligned.pipeline.spec_fields import read_spec

    references: list[str] = args.reference_prompts or []
    weights: list[float] | None = args.reference_weights
    if weights is not None and len(weights) != len(references):
        raise ValueError(
            f"give one --reference-weight per --reference-prompt: {len(weights)} for {len(references)} references"
        )
    values = set_values(args) | given(args, ("reference_weights",))
    if len(references) == 1:
        values["reference_prompt"] = references[0]
    elif references:
        values["reference_prompts"] = references
    spec = read_spec(SetSpec, values)
    spec.check()
    return spec


def run_generate(args: argparse.Namespace) -> None:
    from style_aligned.pipeline.generate import generate_set
    from style_aligned.pipeline.model import kind_of
    from style_aligned.pipeline.set_files import set_request

    spec = generate_spec(args)  # everything that can be checked before the model is read
    asked = set_request("generate", spec, model=str(args.model))
    sd = load_for_set(args, spec, asked)
    if sd is None:
        return
    spec = spec.resolved(sd)
    write_set(
        args,
        "generate",
        spec,
        prompts=spec.image_prompts(),
        make=lambda images, progress: generate_set(sd, spec, progress=progress, images=images),
        model=str(args.model),
        backbone=kind_of(sd),
        request=asked,
    )


def add_generate_command(parser: argparse.ArgumentParser) -> None:
    from style_aligned.pipeline.spec import SetSpec

    parser.description = (
        "Generate a style-consistent set: the first image (--reference-prompt, or the first --prompt) is the"
        " reference, the others share its style (with several --reference-prompt, they blend the references'"
        " styles). Writes one PNG per image, a labelled grid.png and set.json."
    )
    add_model_options(parser)
    add_set_options(parser)
    parser.add_argument(
        "--reference-prompt",
        dest="reference_prompts",
        action="append",
        metavar="PROMPT",
        help="prompt of an extra reference image placed first; repeat to blend the styles of several references",
    )
    parser.add_argument(
        "--reference-weight",
        dest="reference_weights",
        type=float,
        action="append",
        metavar="W",
        help=default_help(SetSpec, "reference_weights"),
    )
    add_style_options(parser)
    add_extras_options(parser)
    parser.set_defaults(command=run_generate)
