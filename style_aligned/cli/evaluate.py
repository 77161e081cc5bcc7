"""`style-aligned evaluate`: the paper's text alignment and set consistency of sets."""

import argparse
import sys
from pathlib import Path

import torch

from style_aligned.evaluation.scoring import (
    CLIP_EXAMPLE,
    DINO_EXAMPLE,
    ClipScorer,
    DinoScorer,
    batch_starts,
    evaluate_sets,
    find_sets,
    read_set,
    scores_table,
    write_scores_csv,
)


def add_evaluate_command(parser: argparse.ArgumentParser) -> None:
    """Configure `parser` as the `evaluate` command (`args.command` is `run_evaluate`)."""
    parser.description = (
        "Score generated sets as in the StyleAligned paper: text alignment (CLIP image-prompt cosine similarity,"
        " mean over the images of a set) and set consistency (DINO CLS cosine similarity, mean over the pairs of"
        " images of a set). Writes a CSV and a Markdown table (one row per set, then the means) and prints the table."
    )
    parser.add_argument("sets_dir", type=Path, metavar="SETS_DIR", help="a set folder, or a folder of set folders")
    for name, example in (("clip", CLIP_EXAMPLE), ("dino", DINO_EXAMPLE)):
        parser.add_argument(
            f"--{name}",
            default=example,
            metavar=name.upper(),
            help=f"a {name.upper()} model and processor: a Hub repo id org/name[@revision] or a folder saved with"
            f" save_pretrained (default: {example})",
        )
    parser.add_argument(
        "--out", type=Path, metavar="PREFIX", help="write PREFIX.csv and PREFIX.md (default: SETS_DIR/evaluation)"
    )
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    parser.add_argument("--batch-size", type=int, default=16, metavar="N", help="images per forward pass (default: 16)")
    parser.add_argument(
        "--text-until",
        metavar="SEP",
        help="score each image against its prompt up to the first SEP (e.g. '.' keeps the object of"
        " 'a toy train. macro photo'); default: the whole prompt",
    )
    parser.add_argument("--exclude-reference", action="store_true", help="leave image 0 of each set out")
    parser.set_defaults(command=run_evaluate)


def run_evaluate(args: argparse.Namespace) -> None:
    """Run the `evaluate` command: score the sets, write the CSV and Markdown files, print the table."""
    sets = find_sets(args.sets_dir)
    for directory in sets:  # before loading the models, so that a broken set is reported at once
        read_set(directory)
    batch_starts(0, args.batch_size)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    print(f"loading CLIP from {args.clip} and DINO from {args.dino} on {device}", file=sys.stderr)
    clip = ClipScorer(args.clip, device)
    dino = DinoScorer(args.dino, device)
    evaluation = evaluate_sets(
        sets,
        clip,
        dino,
        text_until=args.text_until,
        include_reference=not args.exclude_reference,
        batch_size=args.batch_size,
        progress=lambda index, count, path: print(f"[{index}/{count}] {path}", file=sys.stderr),
    )
    prefix: Path = args.out or args.sets_dir / "evaluation"
    prefix.parent.mkdir(parents=True, exist_ok=True)
    table = scores_table(evaluation)
    write_scores_csv(evaluation, Path(f"{prefix}.csv"))
    Path(f"{prefix}.md").write_text(table)
    print(table, end="")
    print(f"wrote {prefix}.csv and {prefix}.md", file=sys.stderr)
