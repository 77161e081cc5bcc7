"""Shared GroupNorm: each image normalised with statistics taken jointly over itself and its reference."""

import refiners.fluxion.layers as fl
import torch
from refiners.fluxion.adapters.adapter import Adapter
from torch import Tensor

from style_aligned.references import by_half, images_per_half


class SharedGroupNormAdapter(fl.Chain, Adapter[fl.GroupNorm]):
    """Compute a GroupNorm's statistics over each target image and its half's reference image together.

    The reference's feature map is placed beside each target's (along the last axis), the target GroupNorm runs on the
    pair, and only the target's own part is kept. A reference paired with itself would keep its statistics, so
    reference images simply keep the plain GroupNorm output. A shared LayerNorm would be a numerical no-op
    (LayerNorm normalises each token on its own) and does not exist here.

    Receives:
        (Float[Tensor, "batch channels height width"]):

    Returns:
        (Float[Tensor, "batch channels height width"]):
    """

    def __init__(self, target: fl.GroupNorm, classifier_free_guidance: bool = True) -> None:
        """Initialize the adapter.

        Args:
            target: The GroupNorm layer to share.
            classifier_free_guidance: Whether the batch is made of an unconditional and a conditional half.
        """
        self.classifier_free_guidance = classifier_free_guidance
        with self.setup_adapter(target):
            super().__init__(target)

    def forward(self, *inputs: Tensor) -> Tensor:
        (x,) = inputs  # (batch, channels, *spatial)
        per_half = images_per_half(x.shape[0], self.classifier_free_guidance)
        output = self.target(x)  # the references keep their plain output, computed exactly as without sharing
        if per_half == 1:
            return output
        images = by_half(x, per_half)  # (halves, per_half, channels, *spatial)
        targets, references = images[:, 1:], images[:, :1]
        paired = torch.cat([targets, references.expand_as(targets)], dim=-1)  # each map beside its reference's
        shared = self.target(paired.flatten(0, 1)).narrow(-1, 0, x.shape[-1])
        by_half(output, per_half)[:, 1:] = shared.reshape(targets.shape)
        return output
