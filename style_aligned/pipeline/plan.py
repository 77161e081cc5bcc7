"""How a set is cut into parts: its references, its chunks of targets, the images of each model call, the parts
that can be made (and kept) one by one, and the shares of a set split across workers.

Every path that makes a set (`generate_set`, `transfer_set`, panoramas, the app's chunk-by-chunk sets, a batch's
split sets, a set resumed after a crash) asks this one planner, so they all cut a set the same way, with any number
of references.
"""

from collections.abc import Collection, Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class SetPlan:
    """The parts of a set of `num_images` images whose first `num_references` are references.

    The targets (every image but the references) run in chunks of `chunk_size` (default: all in one chunk). At every
    step the references run in the same model call as the first chunk, and the other chunks use their recorded
    features: a chunk's targets always share one batch, so any whole chunks of a set equal the same images of the
    whole set.

    Attributes:
        num_images: The images of the set, the references first.
        num_references: How many of them are references.
        chunk_size: How many targets run together (default: all).
    """

    num_images: int
    num_references: int = 1
    chunk_size: int | None = None

    @property
    def references(self) -> list[int]:
        """The indices of the references."""
        return list(range(self.num_references))

    @property
    def chunks(self) -> list[list[int]]:
        """The indices of the targets, in chunks of `chunk_size`."""
        targets = list(range(self.num_references, self.num_images))
        size = self.chunk_size or max(1, len(targets))
        return [targets[start : start + size] for start in range(0, len(targets), size)]

    def chunks_of(self, targets: Collection[int] | None) -> list[list[int]]:
        """The chunks that hold `targets` (default: all of them).

        Raises:
            ValueError: If `targets` are not whole chunks of the set: a chunk's targets run in one batch, so making only
                some of them would change the batch and, by a rounding, the images.
        """
        if targets is None:
            return self.chunks
        wanted = set(targets)
        chosen = [chunk for chunk in self.chunks if wanted.intersection(chunk)]
        if {image for chunk in chosen for image in chunk} != wanted:
            raise ValueError(f"the targets {sorted(wanted)} are not whole chunks of the set's chunks {self.chunks}")
        return chosen

    def calls(self, targets: Collection[int] | None = None) -> list[list[int]]:
        """The images of each model call of a step: the references with the set's first chunk, then the chunks of
        `targets` (default: all) that are not the first.

        The references always run with the set's first chunk, as in the whole set, so that a part of the set is
        computed in the same batches as in the whole set and equals it exactly.
        """
        if not self.chunks:
            return [self.references]
        first = self.chunks[0]
        return [[*self.references, *first], *[chunk for chunk in self.chunks_of(targets) if chunk != first]]

    def work(self, targets: Collection[int] | None = None, *, steps: int, decoded: int | None = None) -> int:
        """The units of progress of the set (or of the part that makes `targets`): one per model call and step, one
        per decoded image (default: the references and the targets)."""
        if decoded is None:
            decoded = self.num_images if targets is None else self.num_references + len(targets)
        return steps * len(self.calls(targets)) + decoded

    def select(self, images: Sequence[int] | None) -> tuple[list[int] | None, list[int]]:
        """The targets to denoise and the images to decode for a part of the set.

        Args:
            images: The images wanted, in order: whole chunks of targets, after the references or without them
                (default: the whole set). The references are denoised for every part; they are decoded only if asked.

        Returns:
            The targets (`None` for all) and the images to decode.

        Raises:
            ValueError: If `images` are out of order, name an image the set does not have, or cut a chunk.
        """
        if images is None:
            return None, list(range(self.num_images))
        chosen = list(images)
        references = [image for image in chosen if image < self.num_references]
        targets = chosen[len(references) :]
        whole = not targets or {i for chunk in self.chunks if set(chunk) & set(targets) for i in chunk} == set(targets)
        if (
            not chosen
            or references not in ([], self.references)
            or chosen != sorted(set(chosen))
            or chosen[-1] >= self.num_images
            or not whole
        ):
            raise ValueError(
                f"a part of a set of {self.num_images} images is its references {self.references} (or none) then"
                f" whole chunks of targets {self.chunks} in order, got {chosen}"
            )
        return targets, chosen

    def parts(self) -> list[list[int]]:
        """The parts that make the set one chunk at a time, each the references and one chunk."""
        return [[*self.references, *chunk] for chunk in self.chunks] or [self.references]

    def shares(self, split: int) -> list[list[int]]:
        """The images of each share of a set split across `split` workers at most: whole chunks dealt out in order,
        the first share with the references. An unsplit set is one share of all its images."""
        count = max(1, min(split, len(self.chunks)))
        bounds = [round(index * len(self.chunks) / count) for index in range(count + 1)]
        shares = [[image for chunk in self.chunks[bounds[i] : bounds[i + 1]] for image in chunk] for i in range(count)]
        return [[*self.references, *shares[0]], *shares[1:]]

    def covering(self, missing: Collection[int]) -> list[int] | None:
        """The fewest images to make so that every image of `missing` is made: the chunks that hold them, with the
        references if one of them is missing (`None` for the whole set, `[]` if nothing is missing)."""
        wanted = set(missing)
        if not wanted:
            return []
        chunks = [chunk for chunk in self.chunks if wanted.intersection(chunk)]
        targets = [image for chunk in chunks for image in chunk]
        if len(targets) == self.num_images - self.num_references and wanted.intersection(self.references):
            return None
        return [*(self.references if wanted.intersection(self.references) else []), *targets]
