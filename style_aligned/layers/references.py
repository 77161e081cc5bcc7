"""The reference images of each batch half, and the layers that hand their features to the other images.

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
    """Give every image of each batch half the tokens of its half's references, as a broadcast view (no copy).

    These are the tokens that shared attention appends to each image's own (SPEC section 1, step 3: `ref(x)`): the
    reference's, or the tokens of the `k` references one after another with several references. They come from the
    batch (its first `k` images of each half) or from the recording (see `ReferenceCache`).

    Receives:
        (Float[Tensor, "halves images_per_half tokens channels"]): Features of every image, by half (see `SplitHalves`).

    Returns:
        (Float[Tensor, "halves images_per_half references*tokens channels"]): The features of each half's references,
            for every image: one view of the references, not a copy per image.

    Example:
        ```py
        get_references = GetReferences(ReferenceCache())
        x = torch.arange(4.0).reshape(2, 2, 1, 1)  # [[uncond_0, uncond_1], [cond_0, cond_1]], one token each
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

    def forward(
        self, x: Float[Tensor, "halves images_per_half tokens channels"]
    ) -> Float[Tensor, "halves images_per_half references_tokens channels"]:
        halves, per_half, _, channels = x.shape
        references = self.reference_cache.references(self, x)  # (halves, references, tokens, channels)
        tokens = references.flatten(1, 2)  # (halves, references * tokens, channels): a view of contiguous rows
        return tokens[:, None].expand(halves, per_half, -1, channels)


class ScaleReferences(fl.Module):
    """Scale the reference features handed to the targets, leaving the references' own copies unscaled.

    On the reference keys given by `GetReferences`, this is `shared_score_scale` (SPEC section 1, step 3:
    `K' = cat([K, s * ref(K)])`): it scales the attention scores of the targets towards their reference. The
    references' own copies stay unscaled, so that each reference keeps its plain self-attention output. When the
    reference cache replays recorded references, every image is a target.

    With `scale == 1` the input is returned as it is (still a broadcast view); otherwise the result holds one copy per
    image.

    Receives:
        (Float[Tensor, "halves images_per_half tokens channels"]): Reference features, as given by `GetReferences`.

    Returns:
        (Float[Tensor, "halves images_per_half tokens channels"]): The same, multiplied by `scale` for the targets.
    """

    def __init__(self, scale: float = 1.0, *, reference_cache: ReferenceCache) -> None:
        """Initialize the layer.

        Args:
            scale: The factor applied to the reference features of target rows (`shared_score_scale`).
            reference_cache: The cache of the adapter that owns this layer (which rows are references).
        """
        super().__init__()
        self.scale = scale
        self.reference_cache = reference_cache

    def forward(self, x: Float[Tensor, "halves images_per_half ..."]) -> Float[Tensor, "halves images_per_half ..."]:
        if self.scale == 1.0:
            return x
        factors = torch.full(x.shape[:2], self.scale, device=x.device, dtype=x.dtype)  # (halves, images_per_half)
        if self.reference_cache.batch_has_references:
            factors[:, : self.reference_cache.num_references] = 1.0  # the references' own copies
        return x * factors.reshape(*x.shape[:2], *(1,) * (x.ndim - 2))


class ReferenceKeys(fl.Chain):
    """The reference keys each image is given: the references' keys (`GetReferences`), scaled for the targets
    (`ScaleReferences`, `shared_score_scale`).

    Receives:
        Query (Float[Tensor, "halves images_per_half tokens channels"]): Not read.
        Key (Float[Tensor, "halves images_per_half tokens channels"]): The keys of every image, by half.
        Value (Float[Tensor, "halves images_per_half tokens channels"]): Not read.

    Returns:
        (Float[Tensor, "halves images_per_half references*tokens channels"]): The reference keys given to each
            image (see `GetReferences`), scaled for the targets.
    """

    def __init__(self, scale: float = 1.0, *, reference_cache: ReferenceCache) -> None:
        """Initialize the layer.

        Args:
            scale: The factor on the reference keys given to the targets.
            reference_cache: The cache of the adapter that owns this layer (where the references come from).
        """
        super().__init__(
            fl.GetArg(1),  # keys: (halves, images_per_half, tokens, channels)
            GetReferences(reference_cache),  # (halves, images_per_half, references * tokens, channels), a view
            ScaleReferences(scale, reference_cache=reference_cache),  # the same, scaled for the targets
        )


class ReferenceValues(fl.Chain):
    """The reference values each image is given: the references' values (`GetReferences`).

    Receives:
        Query (Float[Tensor, "halves images_per_half tokens channels"]): Not read.
        Key (Float[Tensor, "halves images_per_half tokens channels"]): Not read.
        Value (Float[Tensor, "halves images_per_half tokens channels"]): The values of every image, by half.

    Returns:
        (Float[Tensor, "halves images_per_half references*tokens channels"]): The reference values given to each
            image (see `GetReferences`): a broadcast view.
    """

    def __init__(self, *, reference_cache: ReferenceCache) -> None:
        """Initialize the layer.

        Args:
            reference_cache: The cache of the adapter that owns this layer (where the references come from).
        """
        super().__init__(
            fl.GetArg(2),  # values: (halves, images_per_half, tokens, channels)
            GetReferences(reference_cache),  # (halves, images_per_half, references * tokens, channels), a view
        )


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
            classifier_free_guidance: Whether the U-Net's batch must be an unconditional and a conditional half.
            reference_cache: The cache whose mode and number of references the batch must fit.
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
