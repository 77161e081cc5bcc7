"""The reference image of each batch half, and the layers that hand its features to the other images.

See `style_aligned.layers.batch_layout` for the batch layout and `style_aligned.layers.reference_cache` for where
the references come from (the batch itself by default, or a recording of an earlier pass).
"""

import refiners.fluxion.layers as fl
import torch
from jaxtyping import Float
from torch import Tensor

from style_aligned.layers.batch_layout import by_half
from style_aligned.layers.reference_cache import ReferenceCache


class SplitHalves(fl.Module):
    """View a batch by half: `(batch, ...)` becomes `(halves, images_per_half, ...)`.

    The shared attention layers work in this layout, where the references of all images of a half are one broadcast
    view of its first row: no copy of the reference is ever made per image.

    Receives:
        (Float[Tensor, "batch ..."]):

    Returns:
        (Float[Tensor, "halves images_per_half ..."]): A view of the input when it is contiguous.
    """

    def __init__(self, classifier_free_guidance: bool, reference_cache: ReferenceCache) -> None:
        """Initialize the layer.

        Args:
            classifier_free_guidance: Whether the batch is made of an unconditional and a conditional half.
            reference_cache: The cache of the adapter that owns this layer (where the references come from).
        """
        super().__init__()
        self.classifier_free_guidance = classifier_free_guidance
        self.reference_cache = reference_cache

    def forward(self, x: Float[Tensor, "batch ..."]) -> Float[Tensor, "halves images_per_half ..."]:
        per_half = self.reference_cache.images_per_half(x.shape[0], self.classifier_free_guidance)
        return by_half(x, per_half)


class GetReferences(fl.Module):
    """Replace every image of each batch half by the half's reference image, as a broadcast view (no copy).

    Receives:
        (Float[Tensor, "halves images_per_half ..."]): Features of every image, by half (see `SplitHalves`).

    Returns:
        (Float[Tensor, "halves images_per_half ..."]): The features of each half's reference, for every image.

    Example:
        ```py
        get_references = GetReferences(ReferenceCache())
        x = torch.arange(4.0).reshape(2, 2, 1)  # [[uncond_0, uncond_1], [cond_0, cond_1]]
        assert get_references(x).flatten().tolist() == [0.0, 0.0, 2.0, 2.0]
        ```
    """

    def __init__(self, reference_cache: ReferenceCache) -> None:
        """Initialize the layer.

        Args:
            reference_cache: The cache of the adapter that owns this layer (where the references come from).
        """
        super().__init__()
        self.reference_cache = reference_cache

    def forward(self, x: Float[Tensor, "halves images_per_half ..."]) -> Float[Tensor, "halves images_per_half ..."]:
        return self.reference_cache.references(self, x).expand_as(x)


class ReferenceRows(fl.Module):
    """The reference image of each batch half, from the batch or the recording (see `ReferenceCache`).

    Receives:
        (Float[Tensor, "halves images_per_half ..."]): Features of every image, by half (see `SplitHalves`).

    Returns:
        (Float[Tensor, "halves 1 ..."]): The features of each half's reference (a view in the default mode).
    """

    def __init__(self, reference_cache: ReferenceCache) -> None:
        """Initialize the layer.

        Args:
            reference_cache: Where the references come from.
        """
        super().__init__()
        self.reference_cache = reference_cache

    def forward(self, x: Float[Tensor, "halves images_per_half ..."]) -> Float[Tensor, "halves 1 ..."]:
        return self.reference_cache.references(self, x)


class ScaleReferences(fl.Module):
    """Scale the reference features handed to the targets, leaving the reference's own copy unscaled.

    Used on the keys only, it scales the attention scores of targets towards the reference (`shared_score_scale`).
    The reference's own copy stays unscaled so that the reference keeps its plain self-attention output.

    Receives:
        (Float[Tensor, "halves images_per_half tokens channels"]): Reference features, as given by `GetReferences`.

    Returns:
        (Float[Tensor, "halves images_per_half tokens channels"]): The same, multiplied by `scale` for the targets.
    """

    def __init__(self, scale: float = 1.0, *, reference_cache: ReferenceCache) -> None:
        """Initialize the layer.

        Args:
            scale: The factor applied to the reference features of target rows.
            reference_cache: The cache of the adapter that owns this layer (where the references come from).
        """
        super().__init__()
        self.scale = scale
        self.reference_cache = reference_cache

    def forward(self, x: Float[Tensor, "halves images_per_half ..."]) -> Float[Tensor, "halves images_per_half ..."]:
        if self.scale == 1.0:
            return x
        factors = torch.full(x.shape[:2], self.scale, device=x.device, dtype=x.dtype)
        if self.reference_cache.batch_has_references:
            factors[:, 0] = 1.0  # the reference's own copy
        return x * factors.reshape(*x.shape[:2], *(1,) * (x.ndim - 2))


class AppendReferences(fl.Concatenate):
    """Append to each image's tokens the tokens of its half's reference (scaled for the targets, if asked).

    The references are a broadcast view: concatenating allocates the result only.

    Receives:
        (Float[Tensor, "halves images_per_half tokens channels"]): Features of every image, by half.

    Returns:
        (Float[Tensor, "halves images_per_half 2*tokens channels"]): Each image's tokens, then its reference's.
    """

    def __init__(self, scale: float | None = None, *, reference_cache: ReferenceCache) -> None:
        """Initialize the layer.

        Args:
            scale: If given, the appended copies of target rows are scaled by it (a `ScaleReferences` layer).
            reference_cache: The cache of the adapter that owns this layer (where the references come from).
        """
        cache = reference_cache
        references = fl.Chain(GetReferences(cache))
        if scale is not None:
            references.append(ScaleReferences(scale, reference_cache=cache))
        super().__init__(fl.Identity(), references, dim=-2)


class CheckBatchLayout(fl.ContextModule):
    """Check, before a U-Net runs, that its batch fits the StyleAligned layout.

    Placed first in the U-Net, it refuses a bad batch before any layer has stored anything in the U-Net's context;
    should a side branch placed before it have done so, the U-Net's context is reset before the error is raised.

    Receives:
        (Float[Tensor, "batch channels height width"]): The U-Net's input.

    Returns:
        (Float[Tensor, "batch channels height width"]): The same input.
    """

    def __init__(self, classifier_free_guidance: bool, reference_cache: ReferenceCache) -> None:
        """Initialize the layer.

        Args:
            classifier_free_guidance: Whether the batch is made of an unconditional and a conditional half.
            reference_cache: The cache of the adapter that owns this layer (where the references come from).
        """
        super().__init__()
        self.classifier_free_guidance = classifier_free_guidance
        self.reference_cache = reference_cache

    def forward(self, x: Float[Tensor, "batch ..."]) -> Float[Tensor, "batch ..."]:
        try:
            self.reference_cache.images_per_half(x.shape[0], self.classifier_free_guidance)
        except ValueError:
            if (unet := self.parent) is not None:
                for name, value in unet.init_context().items():
                    unet.set_context(name, value)
            raise
        return x
