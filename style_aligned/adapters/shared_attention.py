"""Shared attention for one self-attention layer: the adapter that replaces its scaled dot-product attention."""

import refiners.fluxion.layers as fl
from refiners.fluxion.adapters.adapter import Adapter

from style_aligned.layers.adain import AdaIN
from style_aligned.layers.attention import JointScaledDotProductAttention, SharedScaledDotProductAttention
from style_aligned.layers.reference_attention import ReferenceAttention
from style_aligned.layers.reference_cache import ReferenceCache
from style_aligned.layers.references import ReferenceKeys, ReferenceValues, ScaleReferences, SplitHalves
from style_aligned.options import StyleAlignedOptions


class SharedAttentionAdapter(fl.Chain, Adapter[fl.ScaledDotProductAttention]):
    """Make one self-attention layer attend to the reference image of each batch half.

    It takes the place of the layer's `fl.ScaledDotProductAttention` and receives the projected queries, keys and
    values. By default (see [[arXiv:2312.02133] Style Aligned Image Generation via Shared Attention](
    https://arxiv.org/abs/2312.02133), section 3), its layers are:

    1. `SplitHalves`: the batch seen by half, each half starting with its reference;
    2. `AdaIN` on the queries and keys (and optionally values): each image mapped onto its reference's statistics;
    3. `GetReferences` on the keys and values: the reference tokens each image is given (a view, no copy);
    4. `ScaleReferences` on those keys: `shared_score_scale` for the targets' copies;
    5. `SharedScaledDotProductAttention`: each image attends to its own tokens and to the reference tokens it is
       given (`shared_score_shift` added to their logits), the two merged by log-sum-exp into the attention over the
       concatenated tokens.

    The style strength (`options.strength`) is applied by `AdaIN` and the kernel (see
    `style_aligned.layers.strength`).

    The reference's output is its plain self-attention output: influence flows from the reference to the targets.

    With several references (the reference cache's weights) or `attention_mode="swap"`, the kernel is a
    `ReferenceAttention`: the targets attend to the tokens of every reference, each with its log-weight, after their
    own (`concat`), or to the references' tokens only, without AdaIN (`swap`, Visual Style Prompting). With
    `full_attention_share`, every image attends to all images of its half instead, without AdaIN
    (`JointScaledDotProductAttention` alone).

    Receives:
        Query (Float[Tensor, "batch tokens embedding_dim"]): The layer's projected queries.
        Key (Float[Tensor, "batch tokens embedding_dim"]): Its projected keys.
        Value (Float[Tensor, "batch tokens embedding_dim"]): Its projected values.

    Returns:
        (Float[Tensor, "batch tokens embedding_dim"]): The attention output, before the layer's output projection.
    """

    def __init__(
        self,
        target: fl.ScaledDotProductAttention,
        *,
        options: StyleAlignedOptions,
        classifier_free_guidance: bool,
        reference_cache: ReferenceCache,
    ) -> None:
        """Initialize the adapter.

        Args:
            target: The scaled dot-product attention of a self-attention layer.
            options: AdaIN on queries, keys and values, the score scale and shift, the strength, or full attention
                share.
            classifier_free_guidance: Whether the batch is made of an unconditional and a conditional half.
            reference_cache: Where the references come from (the adapter's cache, shared by all its layers).
        """
        cfg = classifier_free_guidance
        self.full_attention_share = options.full_attention_share
        if options.full_attention_share and reference_cache.num_references > 1:
            raise ValueError("full_attention_share works with one reference, got several")
        layers: list[fl.Module] = (
            [
                # (queries, keys, values): (batch, tokens, channels) each
                JointScaledDotProductAttention(
                    target.num_heads, cfg, slice_size=target.slice_size, reference_cache=reference_cache
                ),
            ]
            if options.full_attention_share
            else reference_attention_layers(target, options, cfg, cache=reference_cache)
            if options.attention_mode == "swap" or reference_cache.num_references > 1
            else shared_attention_layers(
                SharedScaledDotProductAttention(
                    target.num_heads,
                    shift=options.shared_score_shift,
                    strength=options.strength,
                    slice_size=target.slice_size,
                    reference_cache=reference_cache,
                ),
                options,
                cfg,
                cache=reference_cache,
            )
        )
        with self.setup_adapter(target):
            super().__init__(*layers)

    @property
    def shared_score_scale(self) -> float:
        """The factor on the reference keys given to the targets."""
        scale = self.find(ScaleReferences)
        return 1.0 if scale is None else scale.scale

    @shared_score_scale.setter
    def shared_score_scale(self, value: float) -> None:
        self.ensure_find(ScaleReferences).scale = value

    @property
    def shared_score_shift(self) -> float:
        """The constant added to the attention logits of the reference tokens."""
        attention = self.find(SharedScaledDotProductAttention) or self.find(ReferenceAttention)
        return 0.0 if attention is None else attention.shift

    @shared_score_shift.setter
    def shared_score_shift(self, value: float) -> None:
        attention = self.find(SharedScaledDotProductAttention) or self.ensure_find(ReferenceAttention)
        attention.shift = value


def shared_attention_layers(
    attention: fl.Module, options: StyleAlignedOptions, cfg: bool, *, cache: ReferenceCache
) -> list[fl.Module]:
    """The layers before the shared attention kernel (SplitHalves, AdaIN, GetReferences, ScaleReferences), then it.

    Args:
        attention: The kernel: it receives the queries, keys and values, then the reference keys and values each
            image is given, all by half.
        options: AdaIN on queries, keys and values (at the options' strength), and the score scale.
        cfg: Whether the batch is made of an unconditional and a conditional half.
        cache: Where the references come from.
    """
    adain = options.attention_mode == "concat"  # no AdaIN in swap mode

    def _adain(enabled: bool) -> fl.Module:
        return AdaIN(strength=options.strength, reference_cache=cache) if adain and enabled else fl.Identity()

    return [
        # (queries, keys, values): (batch, tokens, channels) each
        fl.Distribute(SplitHalves(cfg, cache), SplitHalves(cfg, cache), SplitHalves(cfg, cache)),
        # (queries, keys, values): (halves, images_per_half, tokens, channels) each, views
        fl.Distribute(_adain(options.adain_queries), _adain(options.adain_keys), _adain(options.adain_values)),
        # (queries, keys, values): the same, renormalised onto the references' statistics
        fl.Parallel(
            fl.GetArg(0),
            fl.GetArg(1),
            fl.GetArg(2),
            ReferenceKeys(options.score_scale, reference_cache=cache),
            ReferenceValues(reference_cache=cache),
        ),
        # (queries, keys, values, reference keys, reference values): (halves, images_per_half, tokens, channels) each,
        # the reference keys and values being what each image is given (broadcast views of the references)
        attention,
        # (batch, tokens, channels)
    ]


def reference_attention_layers(
    target: fl.ScaledDotProductAttention, options: StyleAlignedOptions, cfg: bool, *, cache: ReferenceCache
) -> list[fl.Module]:
    """The layers of shared attention over several references, or of swapped attention (see `ReferenceAttention`)."""
    attention = ReferenceAttention(
        target.num_heads,
        mode=options.attention_mode,
        shift=options.shared_score_shift,
        strength=options.strength,
        slice_size=target.slice_size,
        reference_cache=cache,
    )
    return shared_attention_layers(attention, options, cfg, cache=cache)
