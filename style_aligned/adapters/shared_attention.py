"""Shared attention for one self-attention layer: the adapter that replaces its scaled dot-product attention."""

import refiners.fluxion.layers as fl
from refiners.fluxion.adapters.adapter import Adapter

from style_aligned.layers.adain import AdaIN
from style_aligned.layers.attention import JointScaledDotProductAttention, SharedScaledDotProductAttention
from style_aligned.layers.reference_attention import ReferenceAttention
from style_aligned.layers.reference_cache import ReferenceCache
from style_aligned.layers.references import ReferenceRows, SplitHalves
from style_aligned.options import StyleAlignedOptions


def _adain(enabled: bool, reference_cache: ReferenceCache) -> fl.Module:
    return AdaIN(reference_cache=reference_cache) if enabled else fl.Identity()


class SharedAttentionAdapter(fl.Chain, Adapter[fl.ScaledDotProductAttention]):
    """Make one self-attention layer attend to the reference image of each batch half.

    It takes the place of the layer's `fl.ScaledDotProductAttention` and receives the projected queries, keys and
    values. By default (see [[arXiv:2312.02133] Style Aligned Image Generation via Shared Attention](
    https://arxiv.org/abs/2312.02133), section 3):

    1. AdaIN maps the queries and keys (and optionally values) of each image onto its reference's statistics;
    2. each image attends to its own tokens and to its reference's (keys scaled by `shared_score_scale` for the
       targets, `shared_score_shift` added to their logits), the two merged by log-sum-exp into the attention over
       the concatenated tokens (see `SharedScaledDotProductAttention`).

    The reference's output is its plain self-attention output: influence flows from the reference to the targets.
    With `full_attention_share`, every image attends to all images of its half instead, without AdaIN.

    With several references (the reference cache's weights) or `attention_mode="swap"`, steps 2 and 3 are a
    `ReferenceAttention`: the targets attend to the tokens of every reference, each with its log-weight, after their
    own (`concat`), or to the references' tokens only, without AdaIN (`swap`, Visual Style Prompting).

    Receives:
        Query (Float[Tensor, "batch tokens embedding_dim"]):
        Key (Float[Tensor, "batch tokens embedding_dim"]):
        Value (Float[Tensor, "batch tokens embedding_dim"]):

    Returns:
        (Float[Tensor, "batch tokens embedding_dim"]):
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
            options: AdaIN on queries, keys and values, the score scale and shift, or full attention share.
            classifier_free_guidance: Whether the batch is made of an unconditional and a conditional half.
            reference_cache: Where the references come from (the adapter's cache, shared by all its layers).
        """
        cfg = classifier_free_guidance
        cache = reference_cache
        self.full_attention_share = options.full_attention_share
        if options.full_attention_share and cache.num_references > 1:
            raise ValueError("full_attention_share works with one reference, got several")
        layers: list[fl.Module] = (
            [
                # (queries, keys, values): (batch, tokens, channels) each
                JointScaledDotProductAttention(
                    target.num_heads, cfg, slice_size=target.slice_size, reference_cache=cache
                ),
            ]
            if options.full_attention_share
            else reference_attention_layers(target, options, cfg, cache=cache)
            if options.attention_mode == "swap" or cache.num_references > 1
            else [
                # (queries, keys, values): (batch, tokens, channels) each
                fl.Distribute(SplitHalves(cfg, cache), SplitHalves(cfg, cache), SplitHalves(cfg, cache)),
                # (queries, keys, values): (halves, images_per_half, tokens, channels) each, views
                fl.Distribute(
                    _adain(options.adain_queries, cache),
                    _adain(options.adain_keys, cache),
                    _adain(options.adain_values, cache),
                ),
                # (queries, keys, values, reference keys, reference values): the references (halves, 1, ...)
                fl.Parallel(
                    fl.GetArg(0),
                    fl.GetArg(1),
                    fl.GetArg(2),
                    fl.Chain(fl.GetArg(1), ReferenceRows(cache)),
                    fl.Chain(fl.GetArg(2), ReferenceRows(cache)),
                ),
                SharedScaledDotProductAttention(
                    target.num_heads,
                    scale=options.shared_score_scale,
                    shift=options.shared_score_shift,
                    slice_size=target.slice_size,
                    reference_cache=cache,
                ),
                # (batch, tokens, channels)
            ]
        )
        with self.setup_adapter(target):
            super().__init__(*layers)

    @property
    def shared_score_scale(self) -> float:
        """The factor on the reference keys given to the targets."""
        attention = self.find(SharedScaledDotProductAttention) or self.find(ReferenceAttention)
        return 1.0 if attention is None else attention.scale

    @shared_score_scale.setter
    def shared_score_scale(self, value: float) -> None:
        attention = self.find(SharedScaledDotProductAttention) or self.ensure_find(ReferenceAttention)
        attention.scale = value

    @property
    def shared_score_shift(self) -> float:
        """The constant added to the attention logits of the reference tokens."""
        attention = self.find(SharedScaledDotProductAttention) or self.find(ReferenceAttention)
        return 0.0 if attention is None else attention.shift

    @shared_score_shift.setter
    def shared_score_shift(self, value: float) -> None:
        attention = self.find(SharedScaledDotProductAttention) or self.ensure_find(ReferenceAttention)
        attention.shift = value


def reference_attention_layers(
    target: fl.ScaledDotProductAttention, options: StyleAlignedOptions, cfg: bool, *, cache: ReferenceCache
) -> list[fl.Module]:
    """The layers of shared attention over several references, or of swapped attention (see `ReferenceAttention`)."""
    concat = options.attention_mode == "concat"
    return [
        # (queries, keys, values): (batch, tokens, channels) each
        fl.Distribute(SplitHalves(cfg, cache), SplitHalves(cfg, cache), SplitHalves(cfg, cache)),
        # (queries, keys, values): (halves, images_per_half, tokens, channels) each, views
        fl.Distribute(
            _adain(concat and options.adain_queries, cache),
            _adain(concat and options.adain_keys, cache),
            _adain(concat and options.adain_values, cache),
        ),
        ReferenceAttention(
            target.num_heads,
            mode=options.attention_mode,
            scale=options.shared_score_scale,
            shift=options.shared_score_shift,
            slice_size=target.slice_size,
            reference_cache=cache,
        ),
        # (batch, tokens, channels)
    ]
