"""Structure control for the targets only: the reference of a set stays a plain text-to-image sample."""

from collections.abc import Sequence
from typing import Any, cast

import refiners.fluxion.layers as fl
import torch
from jaxtyping import Float
from torch import Tensor

from style_aligned.layers.reference_cache import ReferenceCache


class RemoveReferenceControl(fl.ContextModule):
    """Take the control of side branches away from the reference images, before the U-Net's down blocks use it.

    ControlNets and Control-LoRAs add residuals to the U-Net's skip connections (the `unet` context's `residuals`),
    T2I-Adapters add features to its down blocks (the `t2iadapter` context). This layer zeroes their rows of the
    reference images, as the reference implementation's ControlNet example does: the reference gets no control and
    is the same sample whatever the control images, while each target keeps its own. Placed right before the down
    blocks, it applies to every control branch, whichever was injected first. The T2I-Adapter features given to the
    U-Net are put back as they were by `RestoreReferenceControl`, the U-Net's last layer.

    Receives:
        (Float[Tensor, "batch channels height width"]): The U-Net's features (passed through unchanged).

    Returns:
        (Float[Tensor, "batch channels height width"]): The same features.
    """

    def __init__(self, classifier_free_guidance: bool, reference_cache: ReferenceCache) -> None:
        """Initialize the layer.

        Args:
            classifier_free_guidance: Whether the batch is made of an unconditional and a conditional half.
            reference_cache: Tells which rows are references (none when it replays recorded references).
        """
        super().__init__()
        self.classifier_free_guidance = classifier_free_guidance
        self.reference_cache = reference_cache

    def forward(self, x: Float[Tensor, "batch ..."]) -> Float[Tensor, "batch ..."]:
        if not self.reference_cache.batch_has_references:
            return x
        per_half = self.reference_cache.images_per_half(x.shape[0], self.classifier_free_guidance)
        keep = torch.ones(x.shape[0] // per_half, per_half, device=x.device, dtype=x.dtype)
        keep[:, : self.reference_cache.num_references] = 0.0  # the reference rows
        keep = keep.flatten()
        residuals: list[Any] = self.use_context("unet")["residuals"]
        for index, residual in enumerate(residuals):
            if isinstance(residual, Tensor):
                residuals[index] = _masked(residual, keep)
        features: dict[str, Any] = self.provider.get_context("t2iadapter") or {}
        given: dict[str, Sequence[Tensor]] = {
            key: cast(Sequence[Tensor], value) for key, value in features.items() if isinstance(value, tuple | list)
        }
        if given and (unet := self.parent) is not None:
            masked = {key: [_masked(f, keep) for f in value] for key, value in given.items()}
            unet.set_context("t2iadapter", masked)  # through the U-Net, so that every layer below sees it
            unet.set_context(_GIVEN, {"features": given})
        return x


_GIVEN = "style_aligned_given_t2i_features"


class RestoreReferenceControl(fl.ContextModule):
    """Put back the T2I-Adapter features that `RemoveReferenceControl` masked, once the U-Net has used them.

    Receives:
        (Float[Tensor, "batch 4 height width"]): The U-Net's output (passed through unchanged).

    Returns:
        (Float[Tensor, "batch 4 height width"]): The same output.
    """

    def forward(self, x: Float[Tensor, "batch ..."]) -> Float[Tensor, "batch ..."]:
        given: dict[str, Any] = self.provider.get_context(_GIVEN) or {}
        if given.get("features") and (unet := self.parent) is not None:
            unet.set_context("t2iadapter", given["features"])
            unet.set_context(_GIVEN, {"features": None})
        return x


def _masked(tensor: Tensor, keep: Tensor) -> Tensor:
    """Zero the rows of a batch (broadcasting a batch of one), without changing the tensor itself."""
    rows = tensor.expand(keep.shape[0], *tensor.shape[1:])
    return rows * keep.to(tensor.dtype).reshape(-1, *(1,) * (tensor.ndim - 1))
