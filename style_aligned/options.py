"""The StyleAligned options: one frozen record of the field list, the defaults per model kind, and the validation.

The adapter, the set specs, the command line's option group, the sweep's grid and the set sidecars all derive from
`StyleAlignedOptions`; each field's `help` (in its metadata) is the one-line explanation shown everywhere.
"""

import dataclasses
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import UnionType
from typing import Any, Literal, Union, cast, get_args, get_origin, get_type_hints

import refiners.fluxion.layers as fl
from refiners.foundationals.latent_diffusion import SD1UNet, SDXLUNet, StableDiffusion_1, StableDiffusion_XL

ModelKind = Literal["sd1", "sdxl", "flux_dev", "flux_schnell"]
"""The model families StyleAligned supports: Stable Diffusion 1.x (and 2.x-style SD1 U-Nets), SDXL, and FLUX.1 with a
guidance embedding ([dev]) or without ([schnell])."""
FLUX_KINDS: tuple[ModelKind, ...] = ("flux_dev", "flux_schnell")
"""The model kinds whose backbone is a FLUX.1 transformer (no U-Net)."""
Block = Literal["down", "mid", "up", "double", "single"]
"""A block of the model: a U-Net's down blocks, middle block or up blocks; FLUX.1's double-stream or single-stream
blocks."""
BLOCKS: tuple[Block, ...] = get_args(Block)
MODEL_BLOCKS: dict[ModelKind, tuple[Block, ...]] = {
    "sd1": ("down", "mid", "up"),
    "sdxl": ("down", "mid", "up"),
    "flux_dev": ("double", "single"),
    "flux_schnell": ("double", "single"),
}
"""The blocks of each model family."""
ScoreSchedule = Literal["fixed", "decrease"]
"""How the factor on the reference keys evolves over the denoising: fixed, or AlignedGen's decrease `(t / 1000)^2`."""
DEFAULT_SCORE_SCALE: dict[ModelKind, float] = {"sd1": 1.0, "sdxl": 1.0, "flux_dev": 1.1, "flux_schnell": 1.1}
"""`shared_score_scale` left unset: 1 on the U-Nets (StyleAligned), 1.1 on FLUX.1 (AlignedGen's example)."""
AttentionMode = Literal["concat", "swap"]
"""How targets share a reference's self-attention: StyleAligned's concatenation, or Visual Style Prompting's swap."""


def model_kind(model: fl.Module) -> ModelKind:
    """The kind of a Refiners U-Net or pipeline (`"sdxl"` or `"sd1"`); a FLUX.1 transformer is `"flux_dev"` or
    `"flux_schnell"` (told by the adapters and the pipeline, which know the FLUX.1 models).

    Raises:
        TypeError: If the model is none of these.
    """
    if isinstance(model, SDXLUNet | StableDiffusion_XL):
        return "sdxl"
    if isinstance(model, SD1UNet | StableDiffusion_1):
        return "sd1"
    raise TypeError(f"expected an SD1 or SDXL U-Net or pipeline, got {type(model).__name__}")


def setting(
    default: Any = dataclasses.MISSING,
    *,
    help: str,
    factory: Callable[[], Any] | None = None,
    flag: str | None = None,
    bounds: tuple[float, float] | None = None,
) -> Any:
    """A dataclass field with its one-line `help` in its metadata (the front ends show it), and its default or default
    factory (neither: the field is required).

    Args:
        default: The default.
        help: The one-line explanation.
        factory: The default factory, instead of a default.
        flag: The command line's flag, when it is not the name with dashes (`--style-strength` for `strength`).
        bounds: The closed range of a number, when it has one (the page shows it as a slider).
    """
    metadata: dict[str, Any] = {"help": help}
    if flag is not None:
        metadata["flag"] = flag
    if bounds is not None:
        metadata["bounds"] = bounds
    if factory is not None:
        return field(default_factory=factory, metadata=metadata)
    return field(default=default, metadata=metadata)


def _option(default: Any, help: str) -> Any:
    return setting(default, help=help)


STRENGTH_BOUNDS = (0.0, 1.0)


@dataclass(frozen=True, kw_only=True)
class StyleAlignedOptions:
    """How the images of a set share the style of the reference (see `docs/parameters.md`).

    Every field has a default; `share_group_norm` defaults to the reference implementation's example for the model
    kind (`None` until `resolved`). Values are checked when the record is made.

    Example:
        ```py
        options = StyleAlignedOptions(shared_score_shift=math.log(2))
        adapter = StyleAlignedAdapter(sd.unet, options).inject()
        ```
    """

    strength: float = setting(
        1.0,
        help="style strength in [0, 1]: 1 is StyleAligned exactly, 0 the plain model, between them the targets move"
        " part of the way to the reference's style (AdaIN, attention to the reference, shared GroupNorm)",
        flag="--style-strength",
        bounds=STRENGTH_BOUNDS,
    )
    adain_queries: bool = _option(
        True, "AdaIN on the queries: match each image's query statistics to the reference's (concat mode)"
    )
    adain_keys: bool = _option(
        True, "AdaIN on the keys: match each image's key statistics to the reference's (concat mode)"
    )
    adain_values: bool = _option(False, "AdaIN on the values too (stronger colour transfer, less diversity)")
    shared_score_scale: float | None = _option(
        None,
        "factor on the reference keys given to the targets (> 0; below 1 weakens the style; default: 1 on U-Nets,"
        " 1.1 on FLUX as AlignedGen's lambda)",
    )
    shared_score_schedule: ScoreSchedule = _option(
        "fixed",
        "fixed: shared_score_scale at every step; decrease: (t/1000)^2 at timestep t, AlignedGen's decreasing lambda"
        " (FLUX only)",
    )
    shared_score_shift: float = _option(
        0.0, "added to the attention logits of the reference tokens (log 2 = 0.69 weighs them twice)"
    )
    share_group_norm: bool | None = _option(
        None, "GroupNorm statistics taken over each image and its reference (default: on for SD1, off for SDXL)"
    )
    only_self_level: float = _option(
        0.0, "rough fraction of self-attention layers left unshared, spread evenly, in [0, 1] (more diverse sets)"
    )
    full_attention_share: bool = _option(
        False, "every image attends to all images of the set, without AdaIN (leaks content between images)"
    )
    shared_layers: tuple[int, ...] | None = _option(
        None, "indices of the self-attention layers to share, in running order (instead of only_self_level)"
    )
    shared_blocks: tuple[Block, ...] | None = _option(
        None,
        "blocks whose self-attention layers to share: down, mid, up on U-Nets; double, single on FLUX (default:"
        " single, as AlignedGen) (instead of only_self_level)",
    )
    shared_window: tuple[float, ...] | None = _option(
        None,
        "FLUX: the part of the denoising that shares, as fractions of the way from noise (0, timestep 1000) to image"
        " (1, timestep 0): F shares up to F, A B from A to B (default: every step, as AlignedGen's example)",
    )
    shifted_reference_positions: bool = _option(
        True,
        "FLUX: the reference's keys given to the targets sit to the right of the image (columns + width,"
        " AlignedGen's ShiftPE); off: at the reference's own positions",
    )
    control_reference: bool = _option(
        False, "ControlNets, Control-LoRAs and T2I-Adapters also control the reference (by default it is left free)"
    )
    attention_mode: AttentionMode = _option(
        "concat",
        "concat: targets attend to their own and the reference's tokens (StyleAligned); swap: target queries attend"
        " to the reference's keys and values only, by default in the last decoder self-attention block (Visual Style"
        " Prompting; no AdaIN, no shared GroupNorm by default)",
    )

    def __post_init__(self) -> None:
        for name in (
            "shared_layers",
            "shared_blocks",
            "shared_window",
        ):  # lists (from JSON or the command line) become tuples
            value = getattr(self, name)
            if value is not None and not isinstance(value, tuple):
                object.__setattr__(self, name, tuple(value))
        self._check()

    def _check(self) -> None:
        scale, shift = self.shared_score_scale, self.shared_score_shift
        low, high = STRENGTH_BOUNDS
        if not low <= self.strength <= high:  # also refuses NaN
            raise ValueError(f"strength must be a number in [0, 1], got {self.strength}")
        if scale is not None and not (math.isfinite(scale) and scale > 0):
            raise ValueError(f"shared_score_scale must be a finite number > 0, got {scale}")
        self._check_flux_options()
        if not math.isfinite(shift):
            raise ValueError(f"shared_score_shift must be a finite number, got {shift}")
        if self.attention_mode not in get_args(AttentionMode):
            raise ValueError(f"attention_mode must be concat or swap, got {self.attention_mode!r}")
        if self.attention_mode == "swap":
            swap_conflicts = {
                "full_attention_share": self.full_attention_share,
                "adain_values": self.adain_values,
                "shared_score_scale": scale not in (None, 1.0),
                "shared_score_schedule": self.shared_score_schedule != "fixed",
                "shared_score_shift": shift != 0.0,
                "strength": self.strength != 1.0,
            }
            if conflicts := [name for name, conflict in swap_conflicts.items() if conflict]:
                raise ValueError(f"{', '.join(conflicts)} only apply with attention_mode='concat', not 'swap'")
        if self.full_attention_share and (scale not in (None, 1.0) or shift != 0.0):
            raise ValueError("shared_score_scale and shared_score_shift have no effect with full_attention_share=True")
        if self.full_attention_share and self.strength != 1.0:
            raise ValueError("strength only applies without full_attention_share (it takes strength 1 only)")
        if self.full_attention_share and self.strength != 1.0:
            raise ValueError("strength only applies without full_attention_share (it takes strength 1 only)")
        if not 0.0 <= self.only_self_level <= 1.0:
            raise ValueError(f"only_self_level must be in [0, 1], got {self.only_self_level}")
        ways = [self.only_self_level != 0.0, self.shared_layers is not None, self.shared_blocks is not None]
        if sum(ways) > 1:
            raise ValueError("choose the shared layers one way: only_self_level, shared_layers or shared_blocks")
        if self.shared_layers is not None and (negative := [i for i in self.shared_layers if i < 0]):
            raise ValueError(f"shared_layers must be indices >= 0, got {negative}")
        if self.shared_blocks is not None and (unknown := sorted(set(self.shared_blocks) - set(BLOCKS))):
            raise ValueError(f"unknown shared_blocks {unknown}: choose among {list(BLOCKS)}")

    def _check_flux_options(self) -> None:
        if self.shared_score_schedule not in get_args(ScoreSchedule):
            raise ValueError(f"shared_score_schedule must be fixed or decrease, got {self.shared_score_schedule!r}")
        if self.shared_score_schedule == "decrease" and self.shared_score_scale is not None:
            raise ValueError("shared_score_scale is not used with shared_score_schedule='decrease': give one of them")
        window = self.shared_window
        if window is not None and not (
            len(window) in (1, 2) and all(0.0 <= w <= 1.0 for w in window) and sorted(window) == list(window)
        ):
            raise ValueError(f"shared_window takes one or two increasing fractions in [0, 1], got {list(window)}")

    @property
    def window(self) -> tuple[float, float]:
        """The shared part of the denoising, `(start, end)` fractions of the way from noise to image."""
        window = self.shared_window or (0.0, 1.0)
        return (0.0, window[0]) if len(window) == 1 else (window[0], window[1])

    @property
    def score_scale(self) -> float:
        """`shared_score_scale` as resolved (1 where it is unset, the U-Nets' default)."""
        return 1.0 if self.shared_score_scale is None else self.shared_score_scale

    @classmethod
    def names(cls) -> tuple[str, ...]:
        """The option names, in order."""
        return tuple(f.name for f in dataclasses.fields(cls))

    @classmethod
    def help(cls, name: str) -> str:
        """The one-line explanation of an option."""
        return next(f.metadata["help"] for f in dataclasses.fields(cls) if f.name == name)

    @classmethod
    def for_transfer(cls) -> "StyleAlignedOptions":
        """The reference implementation's style-transfer example: shared GroupNorm, AdaIN on Q and K, shift log 2."""
        return cls(share_group_norm=True, shared_score_shift=math.log(2))

    def replace(self, **changes: Any) -> "StyleAlignedOptions":
        """A copy with some options changed, checked.

        Raises:
            ValueError: If an option is unknown or out of range.
        """
        check_names(changes)
        return dataclasses.replace(self, **changes)

    def resolved(self, kind: ModelKind) -> "StyleAlignedOptions":
        """The options with the model kind's defaults filled in (the reference examples: SD1 shares GroupNorm in
        concat mode; swap mode, as Visual Style Prompting, shares no GroupNorm; the score scale of
        `DEFAULT_SCORE_SCALE` in concat mode, 1 in swap mode, none when it decreases).

        Raises:
            ValueError: If an option that has no meaning for this kind of model is given (see `meaningless`).
        """
        if names := self.meaningless(kind):
            family = "FLUX.1" if kind in FLUX_KINDS else "a U-Net"
            raise ValueError(
                f"{', '.join(names)} {'has' if len(names) == 1 else 'have'} no meaning on {family}: leave unset"
            )
        group_norm = self.share_group_norm
        if group_norm is None:
            group_norm = kind == "sd1" and self.attention_mode == "concat"
        scale = self.shared_score_scale
        if scale is None and self.shared_score_schedule == "fixed":
            scale = DEFAULT_SCORE_SCALE[kind] if self.attention_mode == "concat" else 1.0
        return dataclasses.replace(self, share_group_norm=group_norm, shared_score_scale=scale)

    def meaningless(self, kind: ModelKind) -> list[str]:
        """The options given that have no meaning for this kind of model: on FLUX.1 (no GroupNorm, no control branch,
        no level, no full share) `share_group_norm`, `only_self_level`, `full_attention_share`, `control_reference`;
        on a U-Net the options of the DiT (`shared_score_schedule`, `shared_window`, `shifted_reference_positions`);
        and blocks of the other family."""
        flux = kind in FLUX_KINDS
        given = {
            "share_group_norm": flux and bool(self.share_group_norm),
            "only_self_level": flux and self.only_self_level != 0.0,
            "full_attention_share": flux and self.full_attention_share,
            "control_reference": flux and self.control_reference,
            "shared_score_schedule": not flux and self.shared_score_schedule != "fixed",
            "shared_window": not flux and self.shared_window is not None,
            "shifted_reference_positions": not flux and not self.shifted_reference_positions,
        }
        names = [name for name, meaningless in given.items() if meaningless]
        if self.shared_blocks is not None and (other := [b for b in self.shared_blocks if b not in MODEL_BLOCKS[kind]]):
            names.append(f"shared_blocks {', '.join(other)}")
        return names

    def to_dict(self) -> dict[str, Any]:
        """The options as JSON values (tuples as lists), for sidecars."""
        return {name: _json(getattr(self, name)) for name in self.names()}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "StyleAlignedOptions":
        """Read options written by `to_dict` (missing ones take their defaults).

        Raises:
            ValueError: If an option is unknown or out of range.
        """
        check_names(data)
        return cls(**data)


@dataclass(frozen=True, kw_only=True)
class OptionField:
    """What the command line, the sweep grid and the app need to know of one field of a settings dataclass (the
    StyleAligned options, a set's spec), read from the dataclass.

    Attributes:
        name: The field's name.
        help: Its one-line explanation (the `help` of its metadata).
        kind: The type of its values: `bool`, `int`, `float`, `str` (a choice among `choices`, or text), `Path`
            (a file, given as text) or a dataclass (an object of fields).
        choices: The allowed values of a `str` field from a `Literal` type.
        many: Whether it takes a list of values.
        default: Its default (`None`: the model kind's, or unset; a default factory is called).
        required: Whether it has no default.
        flag: Its command-line flag: `--` and the name with dashes, unless the field names another.
        bounds: The closed range of a number that has one, or `None`.
    """

    name: str
    help: str
    kind: type
    choices: tuple[str, ...] | None
    many: bool
    default: Any
    required: bool = False
    flag: str = ""
    bounds: tuple[float, float] | None = None


def describe_fields(cls: type) -> tuple[OptionField, ...]:
    """The fields of a settings dataclass that its constructor takes, in order, with their types unpacked (an optional
    type gives its other type; `str | Path` and other unions with `Path` give `Path`)."""
    hints = get_type_hints(cls)
    fields: list[OptionField] = []
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        annotation: Any = hints[f.name]
        if get_origin(annotation) in (Union, UnionType):
            args = [arg for arg in get_args(annotation) if arg is not type(None)]
            annotation = Path if Path in args else args[0]
        many = get_origin(annotation) in (tuple, list)
        if many:
            annotation = get_args(annotation)[0]
            if get_origin(annotation) in (Union, UnionType):  # list[str | Path | Image]: paths
                annotation = Path if Path in get_args(annotation) else get_args(annotation)[0]
        choices = tuple(str(arg) for arg in get_args(annotation)) if get_origin(annotation) is Literal else None
        kind: type = str if choices is not None else annotation
        required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        fields.append(
            OptionField(
                name=f.name,
                help=f.metadata.get("help", ""),
                kind=kind,
                choices=choices,
                many=many,
                default=None if required else default,
                required=required,
                flag=f.metadata.get("flag", f"--{f.name.replace('_', '-')}"),
                bounds=f.metadata.get("bounds"),
            )
        )
    return tuple(fields)


def option_fields() -> tuple[OptionField, ...]:
    """The fields of `StyleAlignedOptions`, in order, with their types unpacked."""
    return describe_fields(StyleAlignedOptions)


BOOLEANS = {"true": True, "on": True, "yes": True, "1": True, "false": False, "off": False, "no": False, "0": False}


def parse_option(name: str, text: str) -> bool | int | float | str:
    """Parse the text of one value of a single-valued option (as a sweep grid gives it).

    Raises:
        ValueError: If the option is unknown, takes a list, or the value does not fit it.
    """
    check_names({name: text})
    option = next(f for f in option_fields() if f.name == name)
    if option.many:
        raise ValueError(f"{name} takes a list of values: give it as a fixed option, not in a grid")
    if option.kind is bool:
        if text.lower() not in BOOLEANS:
            raise ValueError(f"{name} takes true/false, on/off, yes/no or 1/0, got {text!r}")
        return BOOLEANS[text.lower()]
    if option.choices is not None:
        if text not in option.choices:
            raise ValueError(f"{name} takes one of {', '.join(option.choices)}, got {text!r}")
        return text
    try:
        value = option.kind(text)
    except ValueError:
        raise ValueError(f"{name} takes numbers, got {text!r}") from None
    if not math.isfinite(value):
        raise ValueError(f"{name} takes finite numbers, got {text!r}")
    return value


def _json(value: object) -> object:
    return list(cast(tuple[object, ...], value)) if isinstance(value, tuple) else value


def check_names(options: Mapping[str, Any]) -> None:
    """Check that every key names a StyleAligned option.

    Raises:
        ValueError: Naming the first unknown option.
    """
    names = StyleAlignedOptions.names()
    for name in options:
        if name not in names:
            raise ValueError(f"unknown StyleAligned option {name!r}: choose among {', '.join(names)}")
