"""A ControlNet for SDXL, in Refiners' style (Refiners 0.4.0 ships one for SD1 only)."""

import refiners.fluxion.layers as fl
from jaxtyping import Float
from refiners.fluxion.adapters.adapter import Adapter
from refiners.fluxion.context import Contexts
from refiners.foundationals.latent_diffusion import SDXLUNet
from refiners.foundationals.latent_diffusion.range_adapter import RangeAdapter2d
from refiners.foundationals.latent_diffusion.stable_diffusion_1.controlnet import ConditionEncoder
from refiners.foundationals.latent_diffusion.stable_diffusion_xl.unet import DownBlocks, MiddleBlock, TimestepEncoder
from refiners.foundationals.latent_diffusion.unet import ResidualBlock
from torch import Tensor
from torch import device as Device
from torch import dtype as DType

from style_aligned.weights.empty import build_empty


class SDXLControlnet(fl.Passthrough):
    """A half U-Net that adds residuals to the SDXL U-Net's skip connections, from a condition image.

    The architecture of diffusers' SDXL `ControlNetModel` (e.g. `diffusers/controlnet-depth-sdxl-1.0`): the U-Net's
    time and text-time embeddings, down blocks and middle block, a condition encoder added to the first block's
    output, and a zero convolution per down block and after the middle block. It shares the U-Net's contexts: it reads
    the timestep, text embeddings and time ids, and adds its `residuals` (10 for SDXL), times `scale`.

    Receives:
        (Float[Tensor, "batch 4 height width"]): The U-Net's input (passed through unchanged).

    Returns:
        (Float[Tensor, "batch 4 height width"]): The same input; the residuals go to the `unet` context.
    """

    def __init__(
        self, name: str, scale: float = 1.0, *, device: Device | str | None = None, dtype: DType | None = None
    ) -> None:
        """Initialize the ControlNet.

        Args:
            name: Its name, which keys its condition in the `controlnet` context.
            scale: The factor on its residuals.
            device: The device of its weights.
            dtype: The dtype of its weights.
        """
        self.name = name
        self.scale = scale
        super().__init__(
            TimestepEncoder(context_key=f"timestep_embedding_{name}", device=device, dtype=dtype),
            fl.Slicing(dim=1, end=4),  # the latents, should the input carry more channels (inpainting)
            DownBlocks(in_channels=4, device=device, dtype=dtype),
            MiddleBlock(device=device, dtype=dtype),
        )
        self.layer(("DownBlocks", 0), fl.Chain).append(
            fl.Residual(
                fl.UseContext("controlnet", f"condition_{name}"),
                ConditionEncoder(device=device, dtype=dtype),
            ),
        )
        for residual_block in self.layers(ResidualBlock):
            chain = residual_block.layer("Chain", fl.Chain)
            RangeAdapter2d(
                target=chain.layer("Conv2d_1", fl.Conv2d),
                channels=residual_block.out_channels,
                embedding_dim=1280,
                context_key=f"timestep_embedding_{name}",
                device=device,
                dtype=dtype,
            ).inject(chain)
        down_blocks = self.layer("DownBlocks", DownBlocks)
        for index, block in enumerate(down_blocks):
            assert isinstance(block, fl.Chain)
            channels = block[0].out_channels
            assert isinstance(channels, int)
            block.append(self._zero_convolution(channels, index, device, dtype))
        middle = self._zero_convolution(1280, len(down_blocks), device, dtype)
        self.layer("MiddleBlock", MiddleBlock).append(middle)

    def _zero_convolution(
        self, channels: int, index: int, device: Device | str | None, dtype: DType | None
    ) -> fl.Chain:
        def store(x: Float[Tensor, "batch channels height width"]) -> Tensor:
            residuals = self.use_context("unet")["residuals"]
            residuals[index] = residuals[index] + x * self.scale
            return x

        return fl.Passthrough(
            fl.Conv2d(in_channels=channels, out_channels=channels, kernel_size=1, device=device, dtype=dtype),
            fl.Lambda(store),
        )


class SDXLControlnetAdapter(fl.Chain, Adapter[SDXLUNet]):
    """Put an `SDXLControlnet` in an SDXL U-Net (first, so that its residuals are ready for the down blocks).

    Example:
        ```py
        adapter = SDXLControlnetAdapter(sd.unet, name="depth", weights=load_model(path).state_dict()).inject()
        adapter.set_controlnet_condition(depth_image_tensor)  # (batch or 1, 3, height, width), in [0, 1]
        ```
    """

    def __init__(
        self,
        target: SDXLUNet,
        name: str,
        scale: float = 1.0,
        *,
        weights: dict[str, Tensor] | None = None,
    ) -> None:
        """Initialize the adapter.

        Args:
            target: The SDXL U-Net.
            name: The name of the ControlNet (several can be injected under different names).
            scale: The factor on its residuals.
            weights: Its state dict (as converted by `style-aligned convert`); the tensors are used as they are
                (no copy), so that loading holds one copy of the weights.
        """
        self.name = name
        if weights is None:
            controlnet = SDXLControlnet(name=name, scale=scale, device=target.device, dtype=target.dtype)
        else:
            controlnet = build_empty(lambda: SDXLControlnet(name=name, scale=scale))
            controlnet.load_state_dict(weights, assign=True)
        self._controlnet = [controlnet]  # a list: not a registered module
        with self.setup_adapter(target):
            super().__init__(target)

    @property
    def controlnet(self) -> SDXLControlnet:
        return self._controlnet[0]

    def inject(self, parent: fl.Chain | None = None) -> "SDXLControlnetAdapter":
        names = [module.name for module in self.target if isinstance(module, SDXLControlnet)]
        if self.name in names:
            raise RuntimeError(f"a ControlNet named {self.name!r} is already injected")
        self.target.insert(0, self.controlnet)
        return super().inject(parent)

    def eject(self) -> None:
        self.target.remove(self.controlnet)
        super().eject()

    def init_context(self) -> Contexts:
        return {"controlnet": {f"condition_{self.name}": None}}

    @property
    def scale(self) -> float:
        return self.controlnet.scale

    @scale.setter
    def scale(self, value: float) -> None:
        self.controlnet.scale = value

    def set_controlnet_condition(self, condition: Float[Tensor, "batch 3 height width"]) -> None:
        """Set the condition image(s), in [0, 1], at the generation size (one for all, or one per batch row)."""
        self.set_context("controlnet", {f"condition_{self.name}": condition})

    def structural_copy(self) -> "SDXLControlnetAdapter":
        raise RuntimeError("a ControlNet adapter cannot be copied: eject it first")
