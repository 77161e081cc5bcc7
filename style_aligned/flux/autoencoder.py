"""The FLUX.1 autoencoder: a latent-diffusion VAE with 16 latent channels and no quantisation convolutions.

Refiners' `LatentDiffusionAutoencoder` is built for 4 latent channels with quantisation convolutions; this one
takes the shape of diffusers' `AutoencoderKL` configuration (channels per block, resnets per block, latent channels,
norm groups) and FLUX.1's latent scaling: `latents = (mean - 0.1159) * 0.3611`.
"""

from dataclasses import dataclass

import refiners.fluxion.layers as fl
from refiners.fluxion.context import Contexts
from refiners.foundationals.latent_diffusion.auto_encoder import LatentDiffusionAutoencoder
from torch import Tensor
from torch import device as Device
from torch import dtype as DType

_EPS = 1e-6


@dataclass(frozen=True, kw_only=True)
class AutoencoderConfig:
    """The shape of a latent-diffusion VAE, with the names of diffusers' `AutoencoderKL` configuration.

    Attributes:
        block_out_channels: The channels of each resolution, highest first.
        layers_per_block: The resnets of each encoder block (the decoder's have one more).
        latent_channels: The latent channels.
        norm_num_groups: The groups of every group norm.
        use_quant_conv: Whether a 1x1 convolution follows the encoder.
        use_post_quant_conv: Whether a 1x1 convolution precedes the decoder.
        scaling_factor: The scale of the latents the diffusion model sees.
        shift_factor: The shift subtracted from the latents before scaling.
    """

    block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
    layers_per_block: int = 2
    latent_channels: int = 16
    norm_num_groups: int = 32
    use_quant_conv: bool = False
    use_post_quant_conv: bool = False
    scaling_factor: float = 0.3611
    shift_factor: float = 0.1159

    def to_diffusers(self) -> dict[str, object]:
        """The arguments of diffusers' `AutoencoderKL` for this configuration."""
        blocks = len(self.block_out_channels)
        return {
            "in_channels": 3,
            "out_channels": 3,
            "down_block_types": ["DownEncoderBlock2D"] * blocks,
            "up_block_types": ["UpDecoderBlock2D"] * blocks,
            "block_out_channels": list(self.block_out_channels),
            "layers_per_block": self.layers_per_block,
            "latent_channels": self.latent_channels,
            "norm_num_groups": self.norm_num_groups,
            "use_quant_conv": self.use_quant_conv,
            "use_post_quant_conv": self.use_post_quant_conv,
            "scaling_factor": self.scaling_factor,
            "shift_factor": self.shift_factor,
        }


FLUX_AUTOENCODER = AutoencoderConfig()
"""The autoencoder of FLUX.1 [dev] and [schnell]."""


class Resnet(fl.Sum):
    """A VAE resnet: shortcut (a 1x1 convolution where the channels change) plus two norm-SiLU-convolutions.

    Receives:
        (Float[Tensor, "batch in_channels height width"]):

    Returns:
        (Float[Tensor, "batch out_channels height width"]):
    """

    def __init__(
        self, in_channels: int, out_channels: int, groups: int, *, device: Device | str | None, dtype: DType | None
    ) -> None:
        self.in_channels, self.out_channels = in_channels, out_channels
        shortcut = (
            fl.Conv2d(in_channels, out_channels, kernel_size=1, device=device, dtype=dtype)
            if in_channels != out_channels
            else fl.Identity()
        )
        super().__init__(
            shortcut,
            fl.Chain(
                fl.GroupNorm(in_channels, groups, eps=_EPS, device=device, dtype=dtype),
                fl.SiLU(),
                fl.Conv2d(in_channels, out_channels, kernel_size=3, padding=1, device=device, dtype=dtype),
                fl.GroupNorm(out_channels, groups, eps=_EPS, device=device, dtype=dtype),
                fl.SiLU(),
                fl.Conv2d(out_channels, out_channels, kernel_size=3, padding=1, device=device, dtype=dtype),
            ),
        )


def _attention(channels: int, groups: int, device: Device | str | None, dtype: DType | None) -> fl.Residual:
    return fl.Residual(
        fl.GroupNorm(channels, groups, eps=_EPS, device=device, dtype=dtype),
        fl.SelfAttention2d(channels, device=device, dtype=dtype),
    )


def _middle(channels: int, groups: int, device: Device | str | None, dtype: DType | None) -> fl.Chain:
    return fl.Chain(
        Resnet(channels, channels, groups, device=device, dtype=dtype),
        _attention(channels, groups, device, dtype),
        Resnet(channels, channels, groups, device=device, dtype=dtype),
    )


def _output(in_channels: int, out_channels: int, groups: int, device: Device | str | None, dtype: DType | None):
    return fl.Chain(
        fl.GroupNorm(in_channels, groups, eps=_EPS, device=device, dtype=dtype),
        fl.SiLU(),
        fl.Conv2d(in_channels, out_channels, kernel_size=3, padding=1, device=device, dtype=dtype),
    )


class Encoder(fl.Chain):
    """Image to latent mean.

    Receives:
        (Float[Tensor, "batch 3 height width"]): The image in [-1, 1].

    Returns:
        (Float[Tensor, "batch latent_channels height/8 width/8"]): The mean of the latent distribution (with 4
            resolutions; each one more halves the size).
    """

    def __init__(self, config: AutoencoderConfig, device: Device | str | None = None, dtype: DType | None = None):
        channels, groups = config.block_out_channels, config.norm_num_groups
        blocks: list[fl.Chain] = []
        for index, out_channels in enumerate(channels):
            in_channels = channels[max(index - 1, 0)]
            block = fl.Chain(
                Resnet(in_channels if layer == 0 else out_channels, out_channels, groups, device=device, dtype=dtype)
                for layer in range(config.layers_per_block)
            )
            if index < len(channels) - 1:
                block.append(fl.Downsample(out_channels, scale_factor=2, device=device, dtype=dtype))
            blocks.append(block)
        latent = 2 * config.latent_channels
        quant: list[fl.Module] = (
            [fl.Conv2d(latent, latent, kernel_size=1, device=device, dtype=dtype)] if config.use_quant_conv else []
        )
        super().__init__(
            fl.Conv2d(3, channels[0], kernel_size=3, padding=1, device=device, dtype=dtype),
            fl.Chain(*blocks, _middle(channels[-1], groups, device, dtype)),
            _output(channels[-1], latent, groups, device, dtype),
            fl.Chain(*quant, fl.Slicing(dim=1, end=config.latent_channels)),
        )

    def init_context(self) -> Contexts:
        return {"sampling": {"shapes": []}}


class Decoder(fl.Chain):
    """Latents to image.

    Receives:
        (Float[Tensor, "batch latent_channels height width"]):

    Returns:
        (Float[Tensor, "batch 3 height*8 width*8"]): The image in about [-1, 1].
    """

    def __init__(self, config: AutoencoderConfig, device: Device | str | None = None, dtype: DType | None = None):
        channels, groups, latent = config.block_out_channels[::-1], config.norm_num_groups, config.latent_channels
        blocks: list[fl.Chain] = [_middle(channels[0], groups, device, dtype)]
        for index, out_channels in enumerate(channels):
            in_channels = channels[max(index - 1, 0)]
            block = fl.Chain(
                Resnet(in_channels if layer == 0 else out_channels, out_channels, groups, device=device, dtype=dtype)
                for layer in range(config.layers_per_block + 1)
            )
            if index < len(channels) - 1:
                block.append(fl.Upsample(out_channels, upsample_factor=2, device=device, dtype=dtype))
            blocks.append(block)
        quant: list[fl.Module] = (
            [fl.Conv2d(latent, latent, kernel_size=1, device=device, dtype=dtype)] if config.use_post_quant_conv else []
        )
        super().__init__(
            *quant,
            fl.Conv2d(latent, channels[0], kernel_size=3, padding=1, device=device, dtype=dtype),
            fl.Chain(*blocks),
            _output(channels[-1], 3, groups, device, dtype),
        )


class FluxAutoencoder(LatentDiffusionAutoencoder):
    """The FLUX.1 autoencoder: images to scaled and shifted 16-channel latents, and back.

    Example:
        ```py
        autoencoder = FluxAutoencoder()
        latents = autoencoder.encode(image)  # (1, 3, 512, 512) in [-1, 1] -> (1, 16, 64, 64)
        image = autoencoder.decode(latents)
        ```
    """

    def __init__(
        self,
        config: AutoencoderConfig = FLUX_AUTOENCODER,
        device: Device | str | None = None,
        dtype: DType | None = None,
    ) -> None:
        """Build the autoencoder.

        Args:
            config: Its shape and latent scaling (default: FLUX.1's).
            device: The PyTorch device to use.
            dtype: The PyTorch data type to use.
        """
        self.config = config
        fl.Chain.__init__(self, Encoder(config, device, dtype), Decoder(config, device, dtype))

    def encode(self, x: Tensor) -> Tensor:
        """The scaled latents of images in [-1, 1]: `(mean - shift_factor) * scaling_factor`."""
        encoder = self.layer("Encoder", Encoder)
        return (encoder(x) - self.config.shift_factor) * self.config.scaling_factor

    def decode(self, x: Tensor) -> Tensor:
        """The images in about [-1, 1] of scaled latents."""
        decoder = self.layer("Decoder", Decoder)
        return decoder(x / self.config.scaling_factor + self.config.shift_factor)
