"""Shared attention for one FLUX.1 attention layer: the adapters of its rotary embedding and of its kernel."""

from typing import Any

import refiners.fluxion.layers as fl
from refiners.fluxion.adapters.adapter import Adapter

from style_aligned.adapters.flux_sharing import (
    FluxSharedScaledDotProductAttention,
    ImageTokensByHalf,
    ImageTokensOnly,
    PlaceReferenceKeys,
    RotaryByHalf,
    SharingSchedule,
    call_timestep,
)
from style_aligned.flux.transformer import RotaryQueryKey
from style_aligned.layers.adain import AdaIN
from style_aligned.layers.reference_cache import ReferenceCache
from style_aligned.layers.references import GetReferences, SplitHalves
from style_aligned.options import StyleAlignedOptions


class DeferredRotary(fl.Chain, Adapter[RotaryQueryKey]):
    """Pass the queries and keys of a shared layer on before their rotary embedding: the layer's
    `FluxSharedAttentionAdapter` turns them itself, after AdaIN (AdaIN's token statistics are those of the keys
    before the rotary embedding, as in AlignedGen).

    Receives:
        Query (Float[Tensor, "batch tokens dim"]):
        Key (Float[Tensor, "batch tokens dim"]):
        Value (Float[Tensor, "batch tokens dim"]):

    Returns:
        (tuple[Float[Tensor, "batch tokens dim"], ...]): The same, unchanged.
    """

    def __init__(self, target: RotaryQueryKey) -> None:
        with self.setup_adapter(target):
            super().__init__(fl.Distribute(fl.Identity(), fl.Identity(), fl.Identity()))


class PlainAttention(fl.Chain):
    """The layer's own rotary embedding and attention, for the calls outside the shared steps."""


class SharedJointAttention(fl.Chain):
    """The shared attention of AlignedGen (SPEC section 9), for the calls inside the shared steps."""


class FluxSharedAttentionAdapter(fl.Chain, Adapter[fl.ScaledDotProductAttention]):
    """Make one FLUX.1 attention layer attend to the image tokens of the reference, as AlignedGen (arXiv 2509.17088).

    It takes the place of the layer's `fl.ScaledDotProductAttention` (and `DeferredRotary` that of its rotary
    embedding), so it receives the queries, keys and values of the `[text | image]` tokens after their RMS norm,
    before their rotary embedding. In the shared steps (`SharingSchedule`, at the timestep the transformer is called
    with), its layers are:

    1. `SplitHalves`: the batch seen by half, each half starting with its references;
    2. `AdaIN` on the image tokens (`ImageTokensOnly`) of the queries and keys (and optionally values): each image
       mapped onto its reference's statistics; text tokens unchanged;
    3. `RotaryByHalf` on the queries and keys: the rotary embedding of their positions;
    4. `GetReferences` on the image keys and values: the references' image tokens each image is given (a view), the
       keys turned at the shifted positions and scaled by lambda (`PlaceReferenceKeys`, one copy per half);
    5. `FluxSharedScaledDotProductAttention`: each target attends to its own tokens and to the references' image
       tokens, merged by log-sum-exp; the references attend to their own tokens only.

    Outside the shared steps it runs the layer's own rotary embedding and attention.

    Receives:
        Query (Float[Tensor, "batch text+image dim"]): Before the rotary embedding.
        Key (Float[Tensor, "batch text+image dim"]): Before the rotary embedding.
        Value (Float[Tensor, "batch text+image dim"]):

    Returns:
        (Float[Tensor, "batch text+image dim"]): The attention output, before the layer's output projection.
    """

    def __init__(
        self,
        target: fl.ScaledDotProductAttention,
        *,
        options: StyleAlignedOptions,
        classifier_free_guidance: bool,
        reference_cache: ReferenceCache,
        schedule: SharingSchedule,
    ) -> None:
        """Initialize the adapter.

        Args:
            target: The scaled dot-product attention of a FLUX.1 attention layer.
            options: AdaIN on queries, keys and values, the score shift, the strength and the attention mode.
            classifier_free_guidance: Whether the batch is made of an unconditional and a conditional half.
            reference_cache: Where the references come from (the adapter's cache, shared by all its layers).
            schedule: When the layer shares, lambda and the reference's positions (shared by all its layers).
        """
        self.schedule = schedule
        self.strength = options.strength
        """At strength 0 every image attends as in the plain model (see `style_aligned.layers.strength`)."""
        cfg, cache = classifier_free_guidance, reference_cache
        adain = options.attention_mode == "concat"

        def _adain(enabled: bool) -> fl.Module:
            if not (adain and enabled):
                return fl.Identity()
            return ImageTokensOnly(AdaIN(strength=options.strength, reference_cache=cache))

        shared = SharedJointAttention(
            # (queries, keys, values): (batch, text + image, channels) each, before the rotary embedding
            fl.Distribute(SplitHalves(cfg, cache), SplitHalves(cfg, cache), SplitHalves(cfg, cache)),
            # (halves, images_per_half, text + image, channels) each
            fl.Distribute(_adain(options.adain_queries), _adain(options.adain_keys), _adain(options.adain_values)),
            fl.Parallel(
                fl.Chain(fl.GetArg(0), RotaryByHalf()),
                fl.Chain(fl.GetArg(1), RotaryByHalf()),
                fl.GetArg(2),
                fl.Chain(fl.GetArg(1), ImageTokensByHalf(), GetReferences(cache), PlaceReferenceKeys(schedule)),
                fl.Chain(fl.GetArg(2), ImageTokensByHalf(), GetReferences(cache)),
            ),
            # (queries, keys, values): turned; reference keys and values: (halves, images_per_half, references *
            # image, channels), broadcast views of one copy per half
            FluxSharedScaledDotProductAttention(
                target.num_heads,
                mode=options.attention_mode,
                shift=options.shared_score_shift,
                strength=options.strength,
                reference_cache=cache,
            ),
            # (batch, text + image, channels)
        )
        with self.setup_adapter(target):
            super().__init__(shared, PlainAttention(RotaryQueryKey(), target))

    def forward(self, *args: Any) -> Any:
        if self.strength == 0.0 or self.schedule.key_scale(call_timestep(self)) is None:
            return self.ensure_find(PlainAttention)(*args)
        return self.ensure_find(SharedJointAttention)(*args)

    @property
    def shared_score_shift(self) -> float:
        """The constant added to the attention logits of the reference tokens."""
        return self._kernel.shift

    @shared_score_shift.setter
    def shared_score_shift(self, value: float) -> None:
        self._kernel.shift = value

    @property
    def _kernel(self) -> FluxSharedScaledDotProductAttention:
        return self.ensure_find(SharedJointAttention).ensure_find(FluxSharedScaledDotProductAttention)
