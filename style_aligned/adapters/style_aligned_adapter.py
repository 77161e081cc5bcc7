"""StyleAligned for a whole U-Net (shared attention in its self-attention layers, optionally shared GroupNorm) or a
whole FLUX.1 transformer (shared attention in its attention layers, as AlignedGen)."""

from collections.abc import Sequence
from typing import Generic, TypeVar

import refiners.fluxion.layers as fl
from refiners.fluxion.adapters.adapter import Adapter
from refiners.foundationals.latent_diffusion import SD1UNet, SDXLUNet

from style_aligned.adapters.flux_attention import DeferredRotary, FluxSharedAttentionAdapter
from style_aligned.adapters.flux_layers import FluxAttentionLayer, flux_attention_layers, select_flux_shared_layers
from style_aligned.adapters.flux_sharing import SharingSchedule
from style_aligned.adapters.group_norm import SharedGroupNormAdapter
from style_aligned.adapters.shared_attention import SharedAttentionAdapter
from style_aligned.adapters.unet_layers import (
    DOWN_BLOCKS,
    SelfAttentionLayer,
    check_unet,
    own_layers,
    select_shared_layers,
    self_attention_layers,
)
from style_aligned.flux.transformer import FluxTransformer
from style_aligned.layers.control_routing import RemoveReferenceControl, RestoreReferenceControl
from style_aligned.layers.reference_cache import ReferenceCache
from style_aligned.layers.references import CheckBatchLayout
from style_aligned.options import ModelKind, StyleAlignedOptions, model_kind

T = TypeVar("T", bound="SD1UNet | SDXLUNet | FluxTransformer")


class StyleAlignedAdapter(Generic[T], fl.Chain, Adapter[T]):
    """Make the images of a batch share the style of its first image, by shared attention.

    See [[arXiv:2312.02133] Style Aligned Image Generation via Shared Attention](https://arxiv.org/abs/2312.02133).
    Every chosen self-attention layer of the U-Net gets a `SharedAttentionAdapter`; with `share_group_norm`, every
    GroupNorm of the U-Net gets a `SharedGroupNormAdapter`. Cross-attention layers are never touched, and layers of
    side branches inserted by other adapters (ControlNets, Control-LoRAs) are left alone.

    The batch given to the U-Net is `[uncond_0 .. uncond_{n-1} | cond_0 .. cond_{n-1}]` with classifier-free guidance
    (what `LatentDiffusionModel` builds), or `[image_0 .. image_{n-1}]` without; image 0 of each half is the reference.

    Example:
        ```py
        sd = StableDiffusion_XL()
        adapter = StyleAlignedAdapter(sd.unet, StyleAlignedOptions(shared_score_shift=math.log(2))).inject()
        # ... denoise a batch whose first image is the reference ...
        adapter.eject()
        ```
    """

    def __init__(
        self,
        target: T,
        options: StyleAlignedOptions | None = None,
        *,
        classifier_free_guidance: bool = True,
        reference_weights: Sequence[float] = (1.0,),
    ) -> None:
        """Initialize the adapter; nothing is changed in the U-Net until `inject`.

        Args:
            target: The U-Net (`SDXLUNet` or `SD1UNet`), or a `FluxTransformer` (shared as AlignedGen shares it).
            options: How the images share the reference's style (default: `StyleAlignedOptions()`); options left
                to the model kind (`share_group_norm`) take the reference implementation's example for this U-Net.
            classifier_free_guidance: Whether the batch is an unconditional half followed by a conditional half.
            reference_weights: One relative weight per reference: with `k` weights, the first `k` images of each
                half are references, and the targets attend to all of them (see `ReferenceCache.mixture_weights`).

        Raises:
            TypeError: If the target is not a U-Net with self-attention layers.
            ValueError: If a shared layer index is out of range for this U-Net, a reference weight is not a number
                > 0, or full attention share is asked with several references.
            RuntimeError: If StyleAligned is already injected in the U-Net.
        """
        model = _check_model(target)
        _check_not_adapted(model)
        self.options = (options or StyleAlignedOptions()).resolved(_kind(model))
        """The effective options (see `StyleAlignedOptions`); score scale and shift can be changed while injected."""
        self.classifier_free_guidance = classifier_free_guidance
        self.reference_cache = ReferenceCache(reference_weights)
        """Where the shared layers find the references: the batch by default, or a recording (see `ReferenceCache`)."""
        self._injected = False

        options = self.options
        cache = self.reference_cache
        # in lists: not registered modules
        self._check_batch_layout = [CheckBatchLayout(classifier_free_guidance, cache)]
        self._schedule: list[SharingSchedule] = []  # on FLUX.1: when and how its layers share
        self._group_norm_adapters: tuple[tuple[SharedGroupNormAdapter, fl.Chain], ...] = ()
        self._reference_control: list[fl.Module] = []
        if isinstance(model, FluxTransformer):
            self.shared_layers: tuple[SelfAttentionLayer | FluxAttentionLayer, ...] = tuple(
                select_flux_shared_layers(flux_attention_layers(model), options)
            )
            self._schedule.append(_sharing_schedule(model, options))
            self._attention_adapters = _flux_adapters(
                self.shared_layers, options, classifier_free_guidance, cache=cache, schedule=self._schedule[0]
            )
        else:
            unet_layers = select_shared_layers(self_attention_layers(model), options)
            self.shared_layers = tuple(unet_layers)
            self._attention_adapters = tuple(
                (
                    SharedAttentionAdapter(
                        _scaled_dot_product_attention(shared.layer, shared.index),
                        options=options,
                        classifier_free_guidance=classifier_free_guidance,
                        reference_cache=cache,
                    ),
                    shared.layer,
                )
                for shared in unet_layers
            )
            if options.share_group_norm:
                self._group_norm_adapters = tuple(
                    (
                        SharedGroupNormAdapter(group_norm, classifier_free_guidance, cache, strength=options.strength),
                        parent,
                    )
                    for group_norm, parent in own_layers(model, fl.GroupNorm)
                )
            if not options.control_reference:
                self._reference_control = [
                    RemoveReferenceControl(classifier_free_guidance, cache),
                    RestoreReferenceControl(),
                ]
        with self.setup_adapter(target):
            super().__init__(target)

    @property
    def is_injected(self) -> bool:
        """Whether the adapter is injected in its U-Net."""
        return self._injected

    @property
    def shared_score_scale(self) -> float:
        """Factor on the reference keys given to the targets; can be changed while injected."""
        return self.options.score_scale

    @shared_score_scale.setter
    def shared_score_scale(self, value: float) -> None:
        self._set_scores(shared_score_scale=value)

    @property
    def shared_score_shift(self) -> float:
        """Constant added to the attention logits of the reference tokens; can be changed while injected."""
        return self.options.shared_score_shift

    @shared_score_shift.setter
    def shared_score_shift(self, value: float) -> None:
        self._set_scores(shared_score_shift=value)

    def _set_scores(self, **scores: float) -> None:
        """Change `shared_score_scale` or `shared_score_shift` in the options (checked there) and in every layer (on
        FLUX.1 the scale is lambda, in the sharing schedule)."""
        self.options = self.options.replace(**scores)
        for schedule in self._schedule:
            schedule.scale = self.options.shared_score_scale
        for adapter, _ in self._attention_adapters:
            for name, value in scores.items():
                if isinstance(adapter, SharedAttentionAdapter) or name == "shared_score_shift":
                    if not isinstance(adapter, DeferredRotary):
                        setattr(adapter, name, value)

    def inject(self, parent: fl.Chain | None = None) -> "StyleAlignedAdapter[T]":
        """Put the shared layers in the U-Net.

        Everything is checked before anything changes: on error the U-Net is as it was.

        Raises:
            RuntimeError: If StyleAligned is already injected in the U-Net, or a layer to adapt is no longer in place.
        """
        if self._injected:
            raise RuntimeError("this StyleAlignedAdapter is already injected: eject it before injecting it again")
        _check_not_adapted(self.target)
        for adapter, layer_parent in (*self._attention_adapters, *self._group_norm_adapters):
            if not any(module is adapter.target for module in layer_parent):
                raise RuntimeError(
                    f"{type(adapter.target).__name__} in {type(layer_parent).__name__} is no longer in place: the"
                    " model changed since this adapter was made; make a new StyleAlignedAdapter"
                )
        for adapter, layer_parent in (*self._attention_adapters, *self._group_norm_adapters):
            adapter.inject(layer_parent)
        if not isinstance(self.target, FluxTransformer):
            self.target.insert(0, self._check_batch_layout[0])
        if self._reference_control:  # just before the down blocks (after every control branch), and last
            remove, restore = self._reference_control
            self.target.insert(next(i for i, m in enumerate(self.target) if isinstance(m, DOWN_BLOCKS)), remove)
            self.target.append(restore)
        self._injected = True
        return super().inject(parent)

    def eject(self) -> None:
        """Take the shared layers out of the U-Net, leaving it exactly as before `inject`.

        Raises:
            RuntimeError: If the adapter is not injected.
        """
        if not self._injected:
            raise RuntimeError("this StyleAlignedAdapter is not injected: there is nothing to eject")
        if not isinstance(self.target, FluxTransformer):
            self.target.remove(self._check_batch_layout[0])
        for layer in self._reference_control:
            self.target.remove(layer)
        for adapter, _ in (*self._attention_adapters, *self._group_norm_adapters):
            adapter.eject()
        self._injected = False
        super().eject()


def _kind(target: "SD1UNet | SDXLUNet | FluxTransformer") -> ModelKind:
    if isinstance(target, FluxTransformer):
        return "flux_dev" if target.config.guidance_embeds else "flux_schnell"
    return model_kind(target)


def _check_model(target: object) -> "SD1UNet | SDXLUNet | FluxTransformer":
    """The target as a U-Net or a FLUX.1 transformer (see `check_unet`)."""
    return target if isinstance(target, FluxTransformer) else check_unet(target)


def _check_not_adapted(model: fl.Chain) -> None:
    for adapter_type in (SharedAttentionAdapter, SharedGroupNormAdapter, FluxSharedAttentionAdapter):
        if next(own_layers(model, adapter_type), None) is not None:
            raise RuntimeError(f"StyleAligned is already injected in this {type(model).__name__}: eject it first")


def _flux_adapters(
    layers: tuple[SelfAttentionLayer | FluxAttentionLayer, ...],
    options: StyleAlignedOptions,
    classifier_free_guidance: bool,
    *,
    cache: ReferenceCache,
    schedule: SharingSchedule,
) -> tuple[tuple[DeferredRotary | FluxSharedAttentionAdapter, fl.Chain], ...]:
    """The adapters of the shared FLUX.1 layers, with the layer each goes in: the rotary embedding deferred to the
    shared attention, which replaces the kernel."""
    adapters: list[tuple[DeferredRotary | FluxSharedAttentionAdapter, fl.Chain]] = []
    for layer in layers:
        if isinstance(layer, FluxAttentionLayer):
            kernel = FluxSharedAttentionAdapter(
                layer.scaled_dot_product_attention,
                options=options,
                classifier_free_guidance=classifier_free_guidance,
                reference_cache=cache,
                schedule=schedule,
            )
            adapters += [(DeferredRotary(layer.rotary), layer.attention), (kernel, layer.attention)]
    return tuple(adapters)


def _sharing_schedule(transformer: FluxTransformer, options: StyleAlignedOptions) -> SharingSchedule:
    """The per-call schedule of the shared layers: the step window, lambda and the reference's positions."""
    return SharingSchedule(
        window=options.window,
        scale=options.shared_score_scale,
        schedule=options.shared_score_schedule,
        shifted_positions=options.shifted_reference_positions,
        axes_dims=transformer.config.axes_dims_rope,
        theta=transformer.config.rope_theta,
    )


def _scaled_dot_product_attention(layer: fl.SelfAttention, index: int) -> fl.ScaledDotProductAttention:
    for module in layer:
        if isinstance(module, fl.ScaledDotProductAttention):
            return module
    raise ValueError(f"self-attention layer {index} has no scaled dot-product attention of its own")
