"""Shared GroupNorm: each image normalised with statistics taken jointly over itself and its reference."""

import refiners.fluxion.layers as fl
import torch
from refiners.fluxion.adapters.adapter import Adapter
from torch import Tensor

from style_aligned.layers.batch_layout import by_half
from style_aligned.layers.reference_cache import ReferenceCache
from style_aligned.layers.reference_mixture import mixture_statistics
from style_aligned.layers.strength import check_strength, toward


class SharedGroupNormAdapter(fl.Chain, Adapter[fl.GroupNorm]):
    """Compute a GroupNorm's statistics over each target image and its half's reference image together.

    The statistics of each group are those of the target's feature map and the reference's taken as one (as if the
    two maps were placed side by side): `mean = (mean_t + mean_r) / 2`, `var = (var_t + var_r) / 2 + ((mean_t -
    mean_r) / 2)^2`. They are computed in float32 from each image's own statistics, so the reference's statistics
    can be recorded once and the targets run in batches without it (see `ReferenceCache`). A reference paired with
    itself keeps its statistics: reference images keep the plain GroupNorm output. With several references, the
    reference's statistics are those of the weighted mixture of the references (see `mixture_statistics`).

    At a style strength `s` below 1 (see `style_aligned.layers.strength`), a target's mean and variance are
    `own + s (joint - own)`, each; at 0 every image gets the plain GroupNorm output.

    A shared LayerNorm would be a numerical no-op (LayerNorm normalises each token on its own) and does not exist here.

    Receives:
        (Float[Tensor, "batch channels height width"]):

    Returns:
        (Float[Tensor, "batch channels height width"]):
    """

    def __init__(
        self,
        target: fl.GroupNorm,
        classifier_free_guidance: bool,
        reference_cache: ReferenceCache,
        *,
        strength: float = 1.0,
    ) -> None:
        """Initialize the adapter.

        Args:
            target: The GroupNorm layer to share.
            classifier_free_guidance: Whether the batch is made of an unconditional and a conditional half.
            reference_cache: The cache of the adapter that owns this layer (where the references come from).
            strength: The style strength, in [0, 1]: 1 takes the joint statistics, 0 the image's own.

        Raises:
            ValueError: If the strength is not in [0, 1].
        """
        self.classifier_free_guidance = classifier_free_guidance
        self.reference_cache = reference_cache
        self.strength = check_strength(strength)
        with self.setup_adapter(target):
            super().__init__(target)

    def forward(self, *inputs: Tensor) -> Tensor:
        (x,) = inputs  # (batch, channels, *spatial)
        norm = self.target
        if self.strength == 0.0:
            return norm(x)
        groups = x.reshape(x.shape[0], norm.num_groups, -1).float()  # (batch, groups, elements)
        variance, mean = torch.var_mean(groups, dim=-1, keepdim=True, correction=0)
        per_half = self.reference_cache.images_per_half(x.shape[0], self.classifier_free_guidance)
        statistics = by_half(torch.cat([mean, variance], dim=-1), per_half)  # (halves, per_half, groups, 2)
        references = self.reference_cache.references(self, statistics)  # (halves, k, groups, 2)
        first_target = self.reference_cache.num_references if self.reference_cache.batch_has_references else 0
        if first_target > 0:
            output = norm(x)  # the references keep the plain output, computed exactly as without sharing
        else:
            output = torch.empty_like(x)
        if per_half == first_target:
            return output
        target_mean, target_variance = statistics[:, first_target:].chunk(2, dim=-1)
        reference_mean, reference_variance = mixture_statistics(
            references[..., :1], references[..., 1:], self.reference_cache.mixture_weights
        )  # (halves, 1, groups, 1)
        joint_mean = (target_mean + reference_mean) / 2
        joint_variance = (target_variance + reference_variance) / 2 + ((target_mean - reference_mean) / 2) ** 2
        mean = toward(target_mean, joint_mean, self.strength)  # the statistics at the style strength
        variance = toward(target_variance, joint_variance, self.strength)
        normed = (by_half(groups, per_half)[:, first_target:] - mean) * torch.rsqrt(variance + norm.eps)
        shape = (*normed.shape[:2], x.shape[1], -1)  # (halves, targets, channels, spatial elements)
        normed = normed.reshape(shape) * norm.weight.float()[:, None] + norm.bias.float()[:, None]
        by_half(output, per_half)[:, first_target:] = normed.reshape(*shape[:2], *x.shape[1:]).to(x.dtype)
        return output
