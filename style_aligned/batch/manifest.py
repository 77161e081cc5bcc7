"""The batch manifest: a JSON Lines file of sets, one a line, read and checked whole before anything runs.

A line holds an `id` (the set's folder under the output folder), a `kind` (`generate` or `transfer`), the fields of
`SetSpec` (or of `TransferSpec`, with the reference as `image` and `caption`, or a saved `trajectory`), optionally the
`model` and a `split` into shares that run on different workers. See `docs/batch.md`.
"""

import json
import math
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal, cast

from style_aligned.pipeline.set_files import set_request
from style_aligned.pipeline.spec import SetSpec
from style_aligned.pipeline.spec_fields import convert, read_spec, spec_fields
from style_aligned.pipeline.transfer import TransferSpec
from style_aligned.weights.families import flux_kind

Kind = Literal["generate", "transfer"]
SPECS: dict[str, type[SetSpec]] = {"generate": SetSpec, "transfer": TransferSpec}
COMMON_FIELDS = ("id", "kind", "model", "split")
TRANSFER_FIELDS = ("image", "caption", "trajectory")
NOT_FOR_TRANSFER = ("reference_prompt",)  # the trajectory's caption is the reference's prompt
ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


class ManifestError(ValueError):
    """A manifest that cannot run: every bad line, with its number and the problem."""


@dataclass(frozen=True, kw_only=True)
class SetEntry:
    """One set of a manifest.

    Attributes:
        line: Its line number in the manifest (1-based).
        id: The name of its folder under the output folder.
        kind: `"generate"` or `"transfer"`.
        model: The model folder.
        spec: The set, as the `generate` or `transfer` command builds it; with `split`, its chunk size defaults to
            the targets divided by `split`, rounded up.
        split: Into how many shares of whole chunks of targets the set is cut, at most (1: not split).
        image: The reference image of a transfer.
        caption: Its caption.
        trajectory: A saved inversion to transfer from, instead of `image` and `caption`.
        given: The fields given on the line.
    """

    line: int
    id: str
    kind: Kind
    model: Path
    spec: SetSpec
    split: int = 1
    image: Path | None = None
    caption: str | None = None
    trajectory: Path | None = None
    given: frozenset[str] = field(default_factory=lambda: frozenset[str]())

    @property
    def num_targets(self) -> int:
        """The number of images that take the references' style."""
        plan = self.spec.plan()
        return plan.num_images - plan.num_references

    def shares(self) -> list[tuple[int, ...]]:
        """The images each share of the set makes (see `SetPlan.shares`): whole chunks of targets, dealt out in order;
        the first share also makes the references. An unsplit set is one share of all its images."""
        return [tuple(share) for share in self.spec.plan().shares(self.split)]

    def steps_from_trajectory(self) -> bool:
        """Whether the steps (and, unless given, the size) come from the saved trajectory, as `transfer` does."""
        return self.trajectory is not None and "steps" not in self.given

    def identity(self) -> dict[str, Any]:
        """What the set is asked for, as the command that makes it alone records it (see `set_request`): the kind,
        the model, the reference and every setting as given.

        A set on disk is the same set when its sidecar holds the same request (the id and `split` are not part of it:
        a split set is identical to an unsplit one with the same chunk size, and to the set `generate` or `transfer`
        makes with the same options).
        """
        references: dict[str, list[str]] = {}
        if self.kind == "transfer":
            references = {
                "images": [str(self.image)] if self.image else [],
                "captions": [self.caption] if self.caption else [],
                "trajectories": [str(self.trajectory)] if self.trajectory else [],
            }
        asked = set_request(self.kind, self.spec, model=str(self.model), **references)
        if self.steps_from_trajectory():
            asked["steps"] = None
        return asked


def read_manifest(path: Path, *, model: Path | None = None) -> list[SetEntry]:
    """Read and check a whole manifest.

    Relative paths on a line are taken from the manifest's folder. Files are not opened: a missing image fails its
    set when it runs, not the manifest.

    Args:
        path: The JSON Lines file.
        model: The model of the lines that name none.

    Returns:
        The sets, in order.

    Raises:
        FileNotFoundError: If the manifest does not exist.
        ManifestError: Naming every bad line and its problem (unknown field, bad value, duplicate id, ...).
    """
    if not path.is_file():
        raise FileNotFoundError(f"no manifest at {path}")
    entries: list[SetEntry] = []
    problems: list[str] = []
    first_line: dict[str, int] = {}
    for number, text in enumerate(path.read_text().splitlines(), start=1):
        if not text.strip():
            continue
        try:
            entry = read_line(text, number, base=path.parent, model=model)
        except ValueError as error:
            problems.append(f"{path} line {number}: {error}")
            continue
        if entry.id in first_line:
            problems.append(f"{path} line {number}: duplicate id {entry.id!r} (first on line {first_line[entry.id]})")
            continue
        first_line[entry.id] = number
        entries.append(entry)
    if problems:
        raise ManifestError("\n".join(problems))
    if not entries:
        raise ManifestError(f"{path} holds no set")
    return entries


def read_line(text: str, number: int, *, base: Path, model: Path | None) -> SetEntry:
    """Read one line of a manifest.

    Raises:
        ValueError: Naming the problem.
    """
    try:
        data = json.loads(text)
    except json.JSONDecodeError as error:
        raise ValueError(f"not JSON: {error.msg} at column {error.colno}") from None
    if not isinstance(data, dict):
        raise ValueError(f"expected a JSON object, got {type(data).__name__}")
    line = cast(dict[str, Any], data)
    set_id = line.get("id")
    if not isinstance(set_id, str) or not ID.fullmatch(set_id):
        raise ValueError(
            f"id must be a folder name of letters, digits, '.', '_' and '-' (not starting with '.'), got {set_id!r}"
        )
    kind = line.get("kind")
    if kind not in SPECS:
        raise ValueError(f"kind must be one of {', '.join(SPECS)}, got {kind!r}")
    kind = cast(Kind, kind)
    spec_type = SPECS[kind]
    leave_out = NOT_FOR_TRANSFER if kind == "transfer" else ()
    names = [name for name in spec_fields(spec_type) if name not in leave_out]
    allowed = [*COMMON_FIELDS, *(TRANSFER_FIELDS if kind == "transfer" else ()), *names]
    if unknown := [name for name in line if name not in allowed]:
        raise ValueError(f"unknown field {unknown[0]!r} for a {kind} set (fields: {', '.join(allowed)})")

    given = {name: value for name, value in line.items() if name in names}
    spec = read_spec(spec_type, given, base=base, leave_out=leave_out)

    split = convert(line.get("split", 1), int, "split", base=base)
    if split < 1:
        raise ValueError(f"split must be at least 1, got {split}")
    model_path = convert(line["model"], Path, "model", base=base) if "model" in line else model
    image = convert(line["image"], Path, "image", base=base) if "image" in line else None
    caption = convert(line["caption"], str, "caption", base=base) if "caption" in line else None
    trajectory = convert(line["trajectory"], Path, "trajectory", base=base) if "trajectory" in line else None
    from_image = image is not None and caption is not None and trajectory is None
    from_trajectory = trajectory is not None and image is None and caption is None
    if kind == "transfer" and not (from_image or from_trajectory):
        raise ValueError('a transfer needs its reference as "image" and "caption", or as a saved "trajectory"')
    entry = SetEntry(
        line=number,
        id=set_id,
        kind=kind,
        model=model_path or Path(),
        spec=spec,
        split=split,
        image=image,
        caption=caption,
        trajectory=trajectory,
        given=frozenset(line),
    )
    check(entry)
    if model_path is None:
        raise ValueError('no model: give "model" on the line or --model')
    if split > 1 and spec.chunk_size is None:
        entry = replace(entry, spec=replace(spec, chunk_size=max(1, math.ceil(entry.num_targets / split))))
    return entry


def check(entry: SetEntry) -> None:
    """The checks of the set's settings that need no model (those of `SetSpec.resolved`), and the split's.

    Raises:
        ValueError: Naming the problem.
    """
    spec, kind = entry.spec, flux_kind(entry.model) or "sd1"  # SD1 and SDXL refuse the same options
    if entry.steps_from_trajectory() and isinstance(spec, TransferSpec):  # its steps are read when the set runs
        spec = replace(spec, steps=max(spec.steps or 1, spec.offset_for(kind) + 1))
    spec.resolved(kind)
    if entry.split > 1 and entry.num_targets < entry.split:
        raise ValueError(f"split {entry.split} needs at least {entry.split} targets, this set has {entry.num_targets}")
