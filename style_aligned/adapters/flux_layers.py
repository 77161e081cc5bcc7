"""The attention layers of a FLUX.1 transformer that StyleAligned shares, and the choice of which to share."""

from dataclasses import dataclass

import refiners.fluxion.layers as fl

from style_aligned.flux.transformer import FluxTransformer, JointAttention, RotaryQueryKey, SingleStreamAttention
from style_aligned.options import Block, StyleAlignedOptions

DEFAULT_FLUX_BLOCKS: tuple[Block, ...] = ("single",)
"""The blocks shared by default: every single-stream block, as AlignedGen (its `block=(19, 57)`)."""


@dataclass(frozen=True, kw_only=True)
class FluxAttentionLayer:
    """An attention layer of a FLUX.1 transformer.

    Attributes:
        index: Its position among the transformer's attention layers: the double-stream blocks' first (0 to 18 in
            FLUX.1), then the single-stream blocks' (19 to 56), as AlignedGen counts them.
        block: `"double"` or `"single"`.
        attention: The layer (`JointAttention` or `SingleStreamAttention`), parent of the two below.
        rotary: Its rotary embedding of queries and keys.
        scaled_dot_product_attention: Its attention kernel.
    """

    index: int
    block: Block
    attention: fl.Chain
    rotary: RotaryQueryKey
    scaled_dot_product_attention: fl.ScaledDotProductAttention


def flux_attention_layers(transformer: FluxTransformer) -> list[FluxAttentionLayer]:
    """List the attention layers of a FLUX.1 transformer (57 in FLUX.1), in the order they run.

    Raises:
        ValueError: If a layer lacks its rotary embedding or its kernel (another adapter replaced them).
    """
    layers: list[FluxAttentionLayer] = []
    kinds: tuple[tuple[Block, type[fl.Chain]], ...] = (("double", JointAttention), ("single", SingleStreamAttention))
    for block, attention_type in kinds:
        for attention in transformer.layers(attention_type, recurse=True):
            rotary = attention.ensure_find(RotaryQueryKey)
            kernel = next((m for m in attention if type(m) is fl.ScaledDotProductAttention), None)
            if kernel is None:
                raise ValueError(f"attention layer {len(layers)} has no scaled dot-product attention of its own")
            layers.append(
                FluxAttentionLayer(
                    index=len(layers),
                    block=block,
                    attention=attention,
                    rotary=rotary,
                    scaled_dot_product_attention=kernel,
                )
            )
    return layers


def select_flux_shared_layers(
    layers: list[FluxAttentionLayer], options: StyleAlignedOptions
) -> list[FluxAttentionLayer]:
    """Choose the attention layers to share: by index (`shared_layers`, counted as in `FluxAttentionLayer`), by block
    (`shared_blocks`: `double`, `single`), or the default: every single-stream block.

    Raises:
        ValueError: If a layer index is out of range for this transformer.
    """
    if options.shared_layers is not None:
        indices = set(options.shared_layers)
        if unknown := sorted(i for i in indices if not 0 <= i < len(layers)):
            raise ValueError(
                f"shared_layers {unknown} out of range: this transformer has {len(layers)} attention layers"
            )
        return [layer for layer in layers if layer.index in indices]
    blocks = options.shared_blocks or DEFAULT_FLUX_BLOCKS
    return [layer for layer in layers if layer.block in blocks]
