"""Where the shared layers find the reference image of each batch half: in the batch, or recorded from a pass.

By default (`"batch"` mode) image 0 of each batch half is the reference. To generate large sets at constant memory,
the references run with the first chunk of targets (`"record"`: image 0 of each half is the reference, as in
`"batch"` mode, and every shared layer also keeps what later targets need from it: keys, values and AdaIN
statistics, GroupNorm statistics), then the other targets run in batches of any size without it (`"replay"`: every
row is a target and the layers use the recording).
"""

from collections.abc import Generator
from contextlib import contextmanager
from typing import Literal

import refiners.fluxion.layers as fl
from torch import Tensor

from style_aligned.layers.batch_layout import images_per_half

Mode = Literal["batch", "record", "replay"]


class ReferenceCache:
    """The reference features of one denoising step, shared by the layers of one `StyleAlignedAdapter`.

    Example:
        ```py
        cache = adapter.reference_cache
        with cache.record():
            noise = unet(first_chunk)  # batch: [uncond_ref, uncond targets | cond_ref, cond targets]
        with cache.replay():
            for chunk in other_chunks:
                target_noise = unet(chunk)  # batch: [uncond targets | cond targets]
        ```
    """

    def __init__(self) -> None:
        self.mode: Mode = "batch"
        self._recorded: dict[fl.Module, Tensor] = {}

    @property
    def batch_has_references(self) -> bool:
        """Whether image 0 of each batch half is a reference (not in `"replay"` mode)."""
        return self.mode != "replay"

    def images_per_half(self, batch_size: int, classifier_free_guidance: bool) -> int:
        """Check a batch layout and return the number of images in each half.

        Raises:
            ValueError: If the batch does not fit the layout.
        """
        return images_per_half(batch_size, classifier_free_guidance)

    def references(self, owner: fl.Module, features: Tensor) -> Tensor:
        """The reference row of each half of `features`, from the batch or the recording.

        Args:
            owner: The layer asking (each layer has its own recording).
            features: Features of the batch, by half: `(halves, images_per_half, *rest)`.

        Returns:
            The reference rows, shaped `(halves, 1, *rest)` (a view of `features` in `"batch"` mode).

        Raises:
            RuntimeError: In `"replay"` mode, if nothing fitting was recorded for this layer.
        """
        if self.mode == "batch":
            return features[:, :1]
        if self.mode == "record":
            references = features[:, :1]
            # a copy when the batch holds targets too, so that the recording does not keep the whole batch alive
            self._recorded[owner] = (references.clone() if features.shape[1] > 1 else references).detach()
            return references
        references = self._recorded.get(owner)
        if references is None:
            raise RuntimeError("StyleAligned has no recorded references: run the references in record mode first")
        if references.shape[0] != features.shape[0] or references.shape[2:] != features.shape[2:]:
            raise RuntimeError(
                f"the recorded references ({list(references.shape)}) do not fit this batch ({list(features.shape)}):"
                " record them again for this size and layout"
            )
        return references

    @contextmanager
    def record(self) -> Generator[None]:
        """Within this block, image 0 of each batch half is the reference (targets may follow it), and the shared
        layers record the references."""
        self._recorded.clear()
        with self._mode("record"):
            yield

    @contextmanager
    def replay(self) -> Generator[None]:
        """Within this block, the batch holds only targets, which use the recorded references."""
        with self._mode("replay"):
            yield

    @contextmanager
    def _mode(self, mode: Mode) -> Generator[None]:
        if self.mode != "batch":
            raise RuntimeError(f"the reference cache is already in {self.mode} mode")
        self.mode = mode
        try:
            yield
        finally:
            self.mode = "batch"

    def clear(self) -> None:
        """Drop the recorded references."""
        self._recorded.clear()

    @property
    def nbytes(self) -> int:
        """The memory held by the recorded references."""
        return sum(tensor.numel() * tensor.element_size() for tensor in self._recorded.values())
