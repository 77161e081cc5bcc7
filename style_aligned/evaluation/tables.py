"""Tables of scores, as CSV and Markdown: one number format for the evaluation and the sweep."""

import csv
import math
from collections.abc import Sequence
from pathlib import Path

SCORE_COLUMNS = ("text alignment (CLIP)", "set consistency (DINO)")
"""The Markdown headers of the paper's two metrics."""


def score_text(value: float) -> str:
    """A score as shown in a Markdown table: 4 decimals, `n/a` for NaN (a set too small to be scored)."""
    return "n/a" if math.isnan(value) else f"{value:.4f}"


def json_score(value: float) -> float | None:
    """A score as stored in JSON: `null` for NaN."""
    return None if math.isnan(value) else value


def markdown_table(header: Sequence[str], numeric: Sequence[bool], rows: Sequence[Sequence[object]]) -> str:
    """A Markdown table; numeric columns are right-aligned, and `|` in cells is escaped.

    Args:
        header: The column titles.
        numeric: For each column, whether it holds numbers.
        rows: The cells, already formatted as text where a format matters (see `score_text`).

    Returns:
        The table, one line per row, ending with a newline.
    """

    def line(cells: Sequence[object]) -> str:
        return "| " + " | ".join(str(cell).replace("|", r"\|") for cell in cells) + " |"

    rule = "|" + "".join("---:|" if is_number else "---|" for is_number in numeric)
    return "\n".join([line(header), rule, *(line(row) for row in rows)]) + "\n"


def write_csv(path: Path, header: Sequence[str], rows: Sequence[Sequence[object]]) -> None:
    """Write a CSV table (scores at full precision; NaN is written `nan`)."""
    with path.open("w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(header)
        writer.writerows(rows)
