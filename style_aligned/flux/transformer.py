"""The FLUX.1 transformer (rectified-flow DiT of Black Forest Labs) as Refiners chains.

Layout and numerics follow diffusers' `FluxTransformer2DModel`: the image tokens (packed latents) and the T5 text
tokens are projected to the model's width and joined as `[text | image]`; double-stream blocks attend jointly with
separate weights per stream, single-stream blocks treat the sequence as one; the timestep, the pooled CLIP vector
and (for [dev]) the guidance value modulate every block. The image tokens come out as the predicted velocity.

Every attention projects its queries, keys and values with `fl.Linear` layers (where LoRAs go), normalises each
head of the queries and keys (`HeadRMSNorm`), turns them by the rotary embedding (`RotaryEmbedding`) and ends in an
`fl.ScaledDotProductAttention`, which adapters replace as they do the U-Nets'.
"""

import refiners.fluxion.layers as fl
from jaxtyping import Float
from refiners.fluxion.context import Contexts
from refiners.foundationals.latent_diffusion.range_adapter import RangeEncoder
from torch import Tensor
from torch import device as Device
from torch import dtype as DType

from style_aligned.flux.config import FLUX_DEV, FluxConfig
from style_aligned.flux.layers import (
    FLUX_CONTEXT,
    Gate,
    HeadRMSNorm,
    ImageTokens,
    ModulatedLayerNorm,
    Modulation,
    RotaryEmbedding,
    RotaryFrequencies,
    Streams,
)

_TIMESTEP_CHANNELS = 256


class QueryProjection(fl.Chain):
    """A linear projection to queries, then the RMS norm of each head."""


class KeyProjection(fl.Chain):
    """A linear projection to keys, then the RMS norm of each head."""


class QKVProjection(fl.Parallel):
    """The queries, keys and values of one stream.

    Receives:
        (Float[Tensor, "batch tokens dim"]):

    Returns:
        (tuple[Float[Tensor, "batch tokens dim"], ...]): Queries, keys and values, heads side by side.
    """

    def __init__(self, config: FluxConfig, device: Device | str | None = None, dtype: DType | None = None) -> None:
        dim, head_dim = config.inner_dim, config.attention_head_dim
        super().__init__(
            QueryProjection(
                fl.Linear(dim, dim, device=device, dtype=dtype), HeadRMSNorm(head_dim, device=device, dtype=dtype)
            ),
            KeyProjection(
                fl.Linear(dim, dim, device=device, dtype=dtype), HeadRMSNorm(head_dim, device=device, dtype=dtype)
            ),
            fl.Linear(dim, dim, device=device, dtype=dtype),
        )


class RotaryQueryKey(fl.Distribute):
    """The rotary embedding of the queries and keys; the values pass unchanged.

    Receives:
        Query (Float[Tensor, "batch tokens dim"]):
        Key (Float[Tensor, "batch tokens dim"]):
        Value (Float[Tensor, "batch tokens dim"]):

    Returns:
        (tuple[Float[Tensor, "batch tokens dim"], ...]): Turned queries and keys, and the values.
    """

    def __init__(self) -> None:
        super().__init__(RotaryEmbedding(), RotaryEmbedding(), fl.Identity())


class JointAttention(fl.Chain):
    """The attention of a double-stream block: each stream projects its own queries, keys and values, all tokens
    attend to all, and each stream projects its own output.

    Receives:
        (Float[Tensor, "batch text+image dim"]): The modulated tokens.

    Returns:
        (Float[Tensor, "batch text+image dim"]):
    """

    def __init__(self, config: FluxConfig, device: Device | str | None = None, dtype: DType | None = None) -> None:
        dim = config.inner_dim
        super().__init__(
            Streams(image=QKVProjection(config, device, dtype), text=QKVProjection(config, device, dtype)),
            RotaryQueryKey(),
            fl.ScaledDotProductAttention(num_heads=config.num_attention_heads),
            Streams(
                image=fl.Linear(dim, dim, device=device, dtype=dtype),
                text=fl.Linear(dim, dim, device=device, dtype=dtype),
            ),
        )


class SingleStreamAttention(fl.Chain):
    """The attention of a single-stream block, without output projection (the block's output layer takes it).

    Receives:
        (Float[Tensor, "batch tokens dim"]): The modulated tokens.

    Returns:
        (Float[Tensor, "batch tokens dim"]):
    """

    def __init__(self, config: FluxConfig, device: Device | str | None = None, dtype: DType | None = None) -> None:
        super().__init__(
            QKVProjection(config, device, dtype),
            RotaryQueryKey(),
            fl.ScaledDotProductAttention(num_heads=config.num_attention_heads),
        )


class FeedForward(fl.Chain):
    """Linear, tanh-approximated GELU, linear.

    Receives:
        (Float[Tensor, "batch tokens dim"]):

    Returns:
        (Float[Tensor, "batch tokens dim"]):
    """

    def __init__(self, config: FluxConfig, device: Device | str | None = None, dtype: DType | None = None) -> None:
        super().__init__(
            fl.Linear(config.inner_dim, config.mlp_dim, device=device, dtype=dtype),
            fl.GeLU(approximation=fl.GeLUApproximation.TANH),
            fl.Linear(config.mlp_dim, config.inner_dim, device=device, dtype=dtype),
        )


def _gated_feed_forward(key: str, config: FluxConfig, device: Device | str | None, dtype: DType | None) -> fl.Chain:
    return fl.Chain(
        ModulatedLayerNorm(key=key, chunks=6, shift=3, scale=4),
        FeedForward(config, device, dtype),
        Gate(key=key, chunks=6, index=5),
    )


class DoubleStreamBlock(fl.Chain):
    """A double-stream block: joint attention, then a feed-forward layer per stream, each modulated and gated.

    Each stream's modulation gives six vectors: shift, scale and gate of the attention, then of the feed-forward.

    Receives:
        (Float[Tensor, "batch text+image dim"]):

    Returns:
        (Float[Tensor, "batch text+image dim"]):
    """

    def __init__(self, config: FluxConfig, device: Device | str | None = None, dtype: DType | None = None) -> None:
        dim = config.inner_dim
        image, text = "image_modulation", "text_modulation"
        super().__init__(
            Modulation(dim, 6, key=image, device=device, dtype=dtype),
            Modulation(dim, 6, key=text, device=device, dtype=dtype),
            fl.Residual(
                Streams(
                    image=ModulatedLayerNorm(key=image, chunks=6, shift=0, scale=1),
                    text=ModulatedLayerNorm(key=text, chunks=6, shift=0, scale=1),
                ),
                JointAttention(config, device, dtype),
                Streams(image=Gate(key=image, chunks=6, index=2), text=Gate(key=text, chunks=6, index=2)),
            ),
            fl.Residual(
                Streams(
                    image=_gated_feed_forward(image, config, device, dtype),
                    text=_gated_feed_forward(text, config, device, dtype),
                )
            ),
        )


class SingleStreamBlock(fl.Chain):
    """A single-stream block: attention and a feed-forward layer side by side on the modulated tokens, one output
    layer over both, gated.

    Receives:
        (Float[Tensor, "batch text+image dim"]):

    Returns:
        (Float[Tensor, "batch text+image dim"]):
    """

    def __init__(self, config: FluxConfig, device: Device | str | None = None, dtype: DType | None = None) -> None:
        dim, key = config.inner_dim, "single_modulation"
        super().__init__(
            Modulation(dim, 3, key=key, device=device, dtype=dtype),
            fl.Residual(
                ModulatedLayerNorm(key=key, chunks=3, shift=0, scale=1),
                fl.Concatenate(
                    SingleStreamAttention(config, device, dtype),
                    fl.Chain(
                        fl.Linear(dim, config.mlp_dim, device=device, dtype=dtype),
                        fl.GeLU(approximation=fl.GeLUApproximation.TANH),
                    ),
                    dim=-1,
                ),
                fl.Linear(dim + config.mlp_dim, dim, device=device, dtype=dtype),
                Gate(key=key, chunks=3, index=2),
            ),
        )


class DoubleStreamBlocks(fl.Chain):
    """The double-stream blocks, in order."""


class SingleStreamBlocks(fl.Chain):
    """The single-stream blocks, in order."""


class TimestepEmbedding(fl.Chain):
    """The timestep's sinusoids through two linear layers."""


class GuidanceEmbedding(fl.Chain):
    """The guidance value (times 1000) through sinusoids and two linear layers ([dev] only)."""


class PooledTextEmbedding(fl.Chain):
    """The pooled CLIP vector through linear, SiLU, linear."""


class ConditioningEncoder(fl.Passthrough):
    """The conditioning vector of a call: embedded timestep, plus embedded guidance ([dev]), plus projected pooled
    text, stored in the `flux` context.

    The timestep (in [0, 1000]) and the guidance value times 1000 are embedded by 256 sinusoids (cosines first) and
    two linear layers.

    Receives:
        (Any): Passed through.

    Returns:
        (Any): Its input.
    """

    def __init__(self, config: FluxConfig, device: Device | str | None = None, dtype: DType | None = None) -> None:
        dim = config.inner_dim
        terms: list[fl.Module] = [
            TimestepEmbedding(
                fl.UseContext("diffusion", "timestep"),
                RangeEncoder(_TIMESTEP_CHANNELS, dim, device=device, dtype=dtype),
            )
        ]
        if config.guidance_embeds:
            terms.append(
                GuidanceEmbedding(
                    fl.UseContext(FLUX_CONTEXT, "guidance").compose(_times_1000),
                    RangeEncoder(_TIMESTEP_CHANNELS, dim, device=device, dtype=dtype),
                )
            )
        terms.append(
            PooledTextEmbedding(
                fl.UseContext(FLUX_CONTEXT, "pooled_text_embedding"),
                fl.Linear(config.pooled_projection_dim, dim, device=device, dtype=dtype),
                fl.SiLU(),
                fl.Linear(dim, dim, device=device, dtype=dtype),
            )
        )
        super().__init__(fl.Sum(*terms), fl.SetContext(FLUX_CONTEXT, "conditioning"))


def _times_1000(guidance: Tensor) -> Tensor:
    return guidance * 1000


class TextTokens(fl.Chain):
    """The T5 text embedding projected to the model's width, put before the image tokens.

    Receives:
        (Float[Tensor, "batch image dim"]): The image tokens.

    Returns:
        (Float[Tensor, "batch text+image dim"]):
    """

    def __init__(self, config: FluxConfig, device: Device | str | None = None, dtype: DType | None = None) -> None:
        super().__init__(
            fl.Concatenate(
                fl.Chain(
                    fl.UseContext(FLUX_CONTEXT, "text_embedding"),
                    fl.Linear(config.joint_attention_dim, config.inner_dim, device=device, dtype=dtype),
                ),
                fl.Identity(),
                dim=1,
            )
        )


class OutputLayer(fl.Chain):
    """The last adaptive norm (scale first, then shift) and the projection back to packed latent channels.

    Receives:
        (Float[Tensor, "batch image dim"]):

    Returns:
        (Float[Tensor, "batch image in_channels"]):
    """

    def __init__(self, config: FluxConfig, device: Device | str | None = None, dtype: DType | None = None) -> None:
        key = "output_modulation"
        super().__init__(
            Modulation(config.inner_dim, 2, key=key, device=device, dtype=dtype),
            ModulatedLayerNorm(key=key, chunks=2, shift=1, scale=0),
            fl.Linear(config.inner_dim, config.in_channels, device=device, dtype=dtype),
        )


class FluxTransformer(fl.Chain):
    """The FLUX.1 transformer: predicts the velocity of packed latents.

    Set the call's inputs first (the context is reset after every call): `set_timestep`, `set_text_embedding`,
    `set_pooled_text_embedding`, `set_image_ids`, `set_text_ids` and, for a model with guidance embeds ([dev]),
    `set_guidance`.

    Receives:
        (Float[Tensor, "batch image_tokens in_channels"]): The packed noisy latents (see `pack_latents`).

    Returns:
        (Float[Tensor, "batch image_tokens in_channels"]): The predicted velocity `noise - x0`, packed.

    Example:
        ```py
        transformer = FluxTransformer(FLUX_DEV)
        transformer.set_timestep(timestep=torch.tensor([1000.0]))
        transformer.set_guidance(guidance=torch.tensor([3.5]))
        transformer.set_text_embedding(text_embedding=t5_embedding)  # (1, 512, 4096)
        transformer.set_pooled_text_embedding(pooled_text_embedding=clip_pooled)  # (1, 768)
        transformer.set_text_ids(text_ids=torch.zeros(512, 3))
        transformer.set_image_ids(image_ids=image_ids(64, 64))
        velocity = transformer(packed_latents)  # (1, 4096, 64)
        ```
    """

    def __init__(
        self, config: FluxConfig = FLUX_DEV, device: Device | str | None = None, dtype: DType | None = None
    ) -> None:
        """Build the transformer.

        Args:
            config: Its depth, width and conditioning (default: FLUX.1 [dev]).
            device: The PyTorch device to use.
            dtype: The PyTorch data type to use.
        """
        self.config = config
        super().__init__(
            ConditioningEncoder(config, device, dtype),
            RotaryFrequencies(config.axes_dims_rope, config.rope_theta),
            fl.Linear(config.in_channels, config.inner_dim, device=device, dtype=dtype),
            TextTokens(config, device, dtype),
            DoubleStreamBlocks(*(DoubleStreamBlock(config, device, dtype) for _ in range(config.num_layers))),
            SingleStreamBlocks(*(SingleStreamBlock(config, device, dtype) for _ in range(config.num_single_layers))),
            ImageTokens(),
            OutputLayer(config, device, dtype),
        )

    def init_context(self) -> Contexts:
        return {
            "diffusion": {"timestep": None},
            FLUX_CONTEXT: {
                "guidance": None,
                "text_embedding": None,
                "pooled_text_embedding": None,
                "text_ids": None,
                "image_ids": None,
                "conditioning": None,
                "rotary": None,
                "image_modulation": None,
                "text_modulation": None,
                "single_modulation": None,
                "output_modulation": None,
            },
        }

    def set_timestep(self, timestep: Float[Tensor, "*batch"]) -> None:
        """Set the timestep: the noise level times 1000 (1000 is pure noise), one per row or one for all."""
        self.set_context("diffusion", {"timestep": timestep.reshape(-1)})

    def set_guidance(self, guidance: Float[Tensor, "*batch"]) -> None:
        """Set the guidance value of a [dev] model (3.5 is typical), one per row or one for all.

        Raises:
            ValueError: If the model has no guidance embedding ([schnell]).
        """
        if not self.config.guidance_embeds:
            raise ValueError("this FLUX.1 model has no guidance embedding ([schnell]): it takes no guidance value")
        self._update(guidance=guidance.reshape(-1))

    def set_text_embedding(self, text_embedding: Float[Tensor, "batch text_tokens joint_dim"]) -> None:
        """Set the T5 token embeddings of the prompts."""
        self._update(text_embedding=text_embedding)

    def set_pooled_text_embedding(self, pooled_text_embedding: Float[Tensor, "batch pooled_dim"]) -> None:
        """Set the pooled CLIP L embeddings of the prompts."""
        self._update(pooled_text_embedding=pooled_text_embedding)

    def set_text_ids(self, text_ids: Float[Tensor, "text_tokens 3"]) -> None:
        """Set the rotary positions of the text tokens (all zero in FLUX.1), shared by the batch."""
        self._update(text_ids=text_ids)

    def set_image_ids(self, image_ids: Float[Tensor, "image_tokens 3"]) -> None:
        """Set the rotary positions of the image tokens (see `image_ids`), shared by the batch."""
        self._update(image_ids=image_ids)

    def _update(self, **values: Tensor) -> None:
        self.set_context(FLUX_CONTEXT, {**self.use_context(FLUX_CONTEXT), **values})
