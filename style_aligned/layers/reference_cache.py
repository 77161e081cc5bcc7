"""Where the shared layers find the reference images of each batch half: in the batch, or recorded from a pass.

By default (`"batch"` mode) image 0 of each batch half is the reference (images 0 to k - 1 with k references). To
generate large sets at constant memory, the references run with the first chunk of targets (`"record"`: the first k
images of each half are the references, as in `"batch"` mode, and every shared layer also keeps what later targets
need from them: keys, values and AdaIN statistics, GroupNorm statistics), then the other targets run in batches of
any size without them (`"replay"`: every row is a target and the layers use the recording).
"""

import math
from collections.abc import Generator, Sequence
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

    def __init__(self, reference_weights: Sequence[float] = (1.0,)) -> None:
        """Initialize the cache.

        Args:
            reference_weights: One weight per reference (relative; `k` weights for `k` references, the first `k`
                images of each batch half). See `mixture_weights`.

        Raises:
            ValueError: If there is no weight, or a weight is not a finite number > 0.
        """
        self.mode: Mode = "batch"
        self._recorded: dict[fl.Module, Tensor] = {}
        self.mixture_weights = mixture_weights(reference_weights)
        """The references' weights normalised to sum 1 (`(1.0,)` for one reference)."""

    @property
    def num_references(self) -> int:
        """The number of references, the first images of each batch half."""
        return len(self.mixture_weights)

    @property
    def batch_has_references(self) -> bool:
        """Whether image 0 of each batch half is a reference (not in `"replay"` mode)."""
        return self.mode != "replay"

    def images_per_half(self, batch_size: int, classifier_free_guidance: bool) -> int:
        """Check a batch layout for the current mode and return the number of images in each half.

        Raises:
            ValueError: If the batch does not fit the layout and mode.
        """
        per_half = images_per_half(batch_size, classifier_free_guidance)
        count = self.num_references
        if self.mode != "replay" and per_half < count:
            raise ValueError(f"StyleAligned has {count} references: each batch half needs at least {count} images")
        return per_half

    def references(self, owner: fl.Module, features: Tensor) -> Tensor:
        """The reference row of each half of `features`, from the batch or the recording.

        Args:
            owner: The layer asking (each layer has its own recording).
            features: Features of the batch, by half: `(halves, images_per_half, *rest)`.

        Returns:
            The reference rows, shaped `(halves, k, *rest)` for `k` references (a view of `features` in `"batch"`
            mode).

        Raises:
            RuntimeError: In `"replay"` mode, if nothing fitting was recorded for this layer.
        """
        count = self.num_references
        if self.mode == "batch":
            return features[:, :count]
        if self.mode == "record":
            references = features[:, :count]
            # a copy when the batch holds targets too, so that the recording does not keep the whole batch alive
            self._recorded[owner] = (references.clone() if features.shape[1] > count else references).detach()
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
        """Within this block, the first images of each batch half are the references (targets may follow them), and
        the shared layers record the references."""
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


def mixture_weights(reference_weights: Sequence[float]) -> tuple[float, ...]:
    """Normalise the weights of the references to sum 1.

    Weights are relative: `(2, 1)` and `(1, 0.5)` are the same blend, and one reference has weight 1 whatever it is
    given. A reference of weight `w_j` gets `log(w_j / sum(w))` added to its attention logits, and the weight `w_j /
    sum(w)` in the mixture of statistics that AdaIN and shared GroupNorm map the targets onto.

    Raises:
        ValueError: If there is no weight, or a weight is not a finite number > 0.
    """
    weights = [float(weight) for weight in reference_weights]
    if not weights:
        raise ValueError("StyleAligned needs at least one reference weight")
    if bad := [weight for weight in weights if not (math.isfinite(weight) and weight > 0)]:
        raise ValueError(f"reference weights must be finite numbers > 0, got {bad}")
    total = math.fsum(weights)
    return tuple(weight / total for weight in weights)
