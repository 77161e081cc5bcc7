"""The configuration of a FLUX.1 transformer: its depth, width and conditioning."""

from dataclasses import dataclass, fields, replace
from typing import Any


@dataclass(frozen=True, kw_only=True)
class FluxConfig:
    """The shape of a FLUX.1 transformer, with the names of diffusers' `FluxTransformer2DModel` configuration.

    Attributes:
        num_layers: The number of double-stream blocks (19 in FLUX.1).
        num_single_layers: The number of single-stream blocks (38 in FLUX.1).
        num_attention_heads: The number of attention heads (24).
        attention_head_dim: The width of a head (128); the sum of `axes_dims_rope`.
        in_channels: The width of an image token: 16 latent channels packed 2x2 (64).
        joint_attention_dim: The width of a text token, that of T5-XXL (4096).
        pooled_projection_dim: The width of the pooled text vector, that of CLIP L (768).
        guidance_embeds: Whether the model takes a guidance value ([dev]) or not ([schnell]).
        axes_dims_rope: The head channels given to each rotary axis (16, 56, 56).
        rope_theta: The base of the rotary frequencies (10000).
        mlp_ratio: The width of the feed-forward layers over the model's width (4).
    """

    num_layers: int = 19
    num_single_layers: int = 38
    num_attention_heads: int = 24
    attention_head_dim: int = 128
    in_channels: int = 64
    joint_attention_dim: int = 4096
    pooled_projection_dim: int = 768
    guidance_embeds: bool = True
    axes_dims_rope: tuple[int, ...] = (16, 56, 56)
    rope_theta: int = 10000
    mlp_ratio: float = 4.0

    def __post_init__(self) -> None:
        if sum(self.axes_dims_rope) != self.attention_head_dim or any(d % 2 for d in self.axes_dims_rope):
            raise ValueError(
                f"axes_dims_rope {self.axes_dims_rope} must be even and add up to attention_head_dim"
                f" ({self.attention_head_dim})"
            )
        if self.num_layers < 0 or self.num_single_layers < 0:
            raise ValueError("the numbers of blocks must not be negative")

    @property
    def inner_dim(self) -> int:
        """The width of the model: heads times head width (3072)."""
        return self.num_attention_heads * self.attention_head_dim

    @property
    def mlp_dim(self) -> int:
        """The width of the feed-forward layers (12288)."""
        return int(self.inner_dim * self.mlp_ratio)

    @classmethod
    def from_diffusers(cls, config: dict[str, Any]) -> "FluxConfig":
        """The configuration of a diffusers `config.json` (unknown fields are ignored).

        Raises:
            ValueError: If the configuration has a patch size other than 1 or different in and out channels.
        """
        if config.get("patch_size", 1) != 1:
            raise ValueError(f"FLUX.1 transformers have patch_size 1, not {config['patch_size']}")
        if (out := config.get("out_channels")) not in (None, config.get("in_channels", 64)):
            raise ValueError(f"out_channels ({out}) must equal in_channels")
        names = {field.name for field in fields(cls)}
        values = {key: value for key, value in config.items() if key in names}
        if "axes_dims_rope" in values:
            values["axes_dims_rope"] = tuple(values["axes_dims_rope"])
        return cls(**values)

    def to_diffusers(self) -> dict[str, Any]:
        """The arguments of diffusers' `FluxTransformer2DModel` for this configuration."""
        return {
            "num_layers": self.num_layers,
            "num_single_layers": self.num_single_layers,
            "num_attention_heads": self.num_attention_heads,
            "attention_head_dim": self.attention_head_dim,
            "in_channels": self.in_channels,
            "joint_attention_dim": self.joint_attention_dim,
            "pooled_projection_dim": self.pooled_projection_dim,
            "guidance_embeds": self.guidance_embeds,
            "axes_dims_rope": self.axes_dims_rope,
        }


FLUX_DEV = FluxConfig()
"""FLUX.1 [dev]: guidance-distilled, with a guidance embedding."""

FLUX_SCHNELL = replace(FLUX_DEV, guidance_embeds=False)
"""FLUX.1 [schnell]: timestep-distilled (4 steps), without a guidance embedding."""
