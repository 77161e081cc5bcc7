"""The Fluxion layers a FLUX.1 transformer is made of: joint token streams, adaptive-norm modulation, per-head RMS
norm and rotary embeddings.

A FLUX.1 transformer holds its tokens as one sequence `[text | image]`. The double-stream blocks give each stream
its own weights (`Streams`); the single-stream blocks treat the sequence as one. The per-call inputs live in the
`flux` context (see `FluxTransformer.init_context`): the text tokens' embedding tells the length of the text
stream, the conditioning vector feeds each block's modulation, and the rotary frequencies are computed once per call
from the token ids.
"""

from typing import Any, cast

import refiners.fluxion.layers as fl
import torch
from jaxtyping import Float
from torch import Tensor
from torch import device as Device
from torch import dtype as DType
from torch.nn import functional as F

FLUX_CONTEXT = "flux"


def text_length(module: fl.ContextModule) -> int:
    """The number of text tokens of the current call (those of the text embedding in the `flux` context)."""
    embedding = module.use_context(FLUX_CONTEXT).get("text_embedding")
    if embedding is None:
        raise ValueError("the text embedding is not set: call set_text_embedding before the transformer")
    return cast(Tensor, embedding).shape[1]


class ImageStream(fl.Chain):
    """The layers of a double-stream block that see the image tokens only."""


class TextStream(fl.Chain):
    """The layers of a double-stream block that see the text tokens only."""


class Streams(fl.Chain):
    """Layers with separate weights for the text and the image tokens of a joint sequence.

    The sequence is split into its text tokens (the first ones, as many as the text embedding has) and its image
    tokens; the image stream runs first (the order of the original models, which their key maps follow), then the
    text stream, and their outputs are joined again as `[text | image]`. Where the streams return several tensors
    (queries, keys, values), each is joined.

    Receives:
        (Float[Tensor, "batch text+image dim"]):

    Returns:
        (Float[Tensor, "batch text+image out_dim"]): Or a tuple of such tensors.
    """

    def __init__(self, *, image: fl.Module, text: fl.Module) -> None:
        super().__init__(ImageStream(image), TextStream(text))

    def forward(self, *args: Any) -> Any:
        x: Tensor = args[0]
        length = text_length(self)
        image_stream, text_stream = self.layer("ImageStream", ImageStream), self.layer("TextStream", TextStream)
        image = image_stream(x[:, length:])
        text = text_stream(x[:, :length])
        if isinstance(image, tuple):
            pairs = zip(cast(tuple[Tensor, ...], text), cast(tuple[Tensor, ...], image), strict=True)
            return tuple(torch.cat(pair, dim=1) for pair in pairs)
        return torch.cat((text, image), dim=1)


class ImageTokens(fl.ContextModule):
    """Keep the image tokens of a joint sequence.

    Receives:
        (Float[Tensor, "batch text+image dim"]):

    Returns:
        (Float[Tensor, "batch image dim"]):
    """

    def forward(self, x: Tensor) -> Tensor:
        return x[:, text_length(self) :]


class Modulation(fl.Passthrough):
    """Compute the shifts, scales and gates of a block from the conditioning vector, into the `flux` context.

    `SiLU` then one linear layer give `chunks` vectors of the model's width, stored whole under `key` and read by
    `ModulatedLayerNorm` and `Gate`.

    Receives:
        (Any): Passed through.

    Returns:
        (Any): Its input.
    """

    def __init__(
        self, dim: int, chunks: int, *, key: str, device: Device | str | None = None, dtype: DType | None = None
    ) -> None:
        self.chunks = chunks
        self.key = key
        super().__init__(
            fl.UseContext(FLUX_CONTEXT, "conditioning"),
            fl.SiLU(),
            fl.Linear(dim, chunks * dim, device=device, dtype=dtype),
            fl.SetContext(FLUX_CONTEXT, key),
        )


def modulation_chunk(module: fl.ContextModule, key: str, *, chunks: int, index: int) -> Float[Tensor, "batch 1 dim"]:
    """One vector of a block's modulation, ready to broadcast over tokens."""
    modulation = cast(Tensor | None, module.use_context(FLUX_CONTEXT).get(key))
    if modulation is None:
        raise ValueError(f"the modulation {key} is not set")
    return modulation.chunk(chunks, dim=1)[index][:, None]


class ModulatedLayerNorm(fl.ContextModule):
    """Layer norm without weights, then `x * (1 + scale) + shift` with a shift and scale of the block's modulation.

    Receives:
        (Float[Tensor, "batch tokens dim"]):

    Returns:
        (Float[Tensor, "batch tokens dim"]):
    """

    def __init__(self, *, key: str, chunks: int, shift: int, scale: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.key, self.chunks, self.shift, self.scale, self.eps = key, chunks, shift, scale, eps

    def forward(self, x: Tensor) -> Tensor:
        shift = modulation_chunk(self, self.key, chunks=self.chunks, index=self.shift)
        scale = modulation_chunk(self, self.key, chunks=self.chunks, index=self.scale)
        return F.layer_norm(x, (x.shape[-1],), eps=self.eps) * (1 + scale) + shift


class Gate(fl.ContextModule):
    """Multiply by a gate of the block's modulation.

    Receives:
        (Float[Tensor, "batch tokens dim"]):

    Returns:
        (Float[Tensor, "batch tokens dim"]):
    """

    def __init__(self, *, key: str, chunks: int, index: int) -> None:
        super().__init__()
        self.key, self.chunks, self.index = key, chunks, index

    def forward(self, x: Tensor) -> Tensor:
        return modulation_chunk(self, self.key, chunks=self.chunks, index=self.index) * x


class HeadRMSNorm(torch.nn.RMSNorm, fl.WeightedModule):
    """RMS norm over each attention head's channels (FLUX's query and key norm), with a learned scale.

    Receives:
        (Float[Tensor, "batch tokens heads*head_dim"]):

    Returns:
        (Float[Tensor, "batch tokens heads*head_dim"]):
    """

    def __init__(
        self, head_dim: int, eps: float = 1e-6, *, device: Device | str | None = None, dtype: DType | None = None
    ) -> None:
        super().__init__(  # pyright: ignore[reportUnknownMemberType]
            normalized_shape=head_dim, eps=eps, elementwise_affine=True, device=device, dtype=dtype
        )
        self.head_dim = head_dim

    def forward(self, x: Tensor) -> Tensor:
        return super().forward(x.reshape(*x.shape[:-1], -1, self.head_dim)).flatten(-2)


def rotary_frequencies(
    ids: Float[Tensor, "tokens axes"], axes_dims: tuple[int, ...], theta: int
) -> Float[Tensor, "2 tokens head_dim"]:
    """The cosines and sines of the rotary embedding of tokens with the given ids.

    Each axis `i` of the ids turns `axes_dims[i]` channels of each head, in pairs of adjacent channels, at the
    frequencies `theta ** (-2j / axes_dims[i])`; they are computed in float64 and returned in float32, as in the
    reference implementation.

    Args:
        ids: The position of each token on each axis (FLUX.1: text tokens all zero, image token (r, c) at (0, r, c)).
        axes_dims: The channels turned by each axis (FLUX.1: 16, 56, 56).
        theta: The base of the frequencies (FLUX.1: 10000).

    Returns:
        The cosines (index 0) and sines (index 1), each repeated for both channels of a pair.
    """
    dtype = torch.float32 if ids.device.type == "mps" else torch.float64
    positions = ids.float()
    cosines: list[Tensor] = []
    sines: list[Tensor] = []
    for axis, dim in enumerate(axes_dims):
        frequencies = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=dtype, device=ids.device) / dim))
        angles = torch.outer(positions[:, axis], frequencies)
        cosines.append(angles.cos().repeat_interleave(2, dim=1).float())
        sines.append(angles.sin().repeat_interleave(2, dim=1).float())
    return torch.stack((torch.cat(cosines, dim=-1), torch.cat(sines, dim=-1)))


class RotaryFrequencies(fl.Passthrough):
    """Compute the rotary frequencies of the `[text | image]` tokens from their ids, into the `flux` context.

    Receives:
        (Any): Passed through.

    Returns:
        (Any): Its input.
    """

    def __init__(self, axes_dims: tuple[int, ...], theta: int = 10000) -> None:
        self.axes_dims = axes_dims
        self.theta = theta
        super().__init__(
            fl.Lambda(self.frequencies),
            fl.SetContext(FLUX_CONTEXT, "rotary"),
        )

    def frequencies(self, *_: Any) -> Tensor:
        context = self.use_context(FLUX_CONTEXT)
        text_ids, image_ids = context.get("text_ids"), context.get("image_ids")
        if text_ids is None or image_ids is None:
            raise ValueError("the token ids are not set: call set_text_ids and set_image_ids before the transformer")
        ids = torch.cat((cast(Tensor, text_ids), cast(Tensor, image_ids)), dim=0)
        return rotary_frequencies(ids, self.axes_dims, self.theta)


def apply_rotary(
    x: Float[Tensor, "batch tokens heads*head_dim"], frequencies: Float[Tensor, "2 tokens head_dim"]
) -> Float[Tensor, "batch tokens heads*head_dim"]:
    """Turn each pair of adjacent channels of each head by the angle of its token and channel."""
    cosines, sines = frequencies[0][:, None], frequencies[1][:, None]  # tokens 1 head_dim
    heads = x.reshape(*x.shape[:-1], -1, frequencies.shape[-1])  # batch tokens heads head_dim
    real, imaginary = heads.reshape(*heads.shape[:-1], -1, 2).unbind(-1)
    rotated = torch.stack((-imaginary, real), dim=-1).flatten(-2)
    return (heads.float() * cosines + rotated.float() * sines).to(x.dtype).flatten(-2)


class RotaryEmbedding(fl.ContextModule):
    """Apply the rotary embedding of the current call's tokens (see `RotaryFrequencies`) to queries or keys.

    It stands before the scaled dot-product attention, so that an adapter can replace that attention and receive
    queries and keys already turned.

    Receives:
        (Float[Tensor, "batch tokens heads*head_dim"]):

    Returns:
        (Float[Tensor, "batch tokens heads*head_dim"]):
    """

    def forward(self, x: Tensor) -> Tensor:
        frequencies = cast(Tensor | None, self.use_context(FLUX_CONTEXT).get("rotary"))
        if frequencies is None:
            raise ValueError("the rotary frequencies are not set")
        if frequencies.shape[1] != x.shape[1]:
            raise ValueError(f"{x.shape[1]} tokens but {frequencies.shape[1]} token ids")
        return apply_rotary(x, frequencies)
