"""What a set is: `SetSpec`, its defaults per model kind, what each kind refuses, and the images it makes
(`GeneratedSet`)."""

from dataclasses import dataclass, replace

from PIL import Image

from style_aligned.layers.reference_cache import mixture_weights
from style_aligned.options import FLUX_KINDS, ModelKind, StyleAlignedOptions, setting
from style_aligned.pipeline.composition import ControlSpec, Extras, IPAdapterSpec, LoraSpec
from style_aligned.pipeline.model import Model, kind_of
from style_aligned.pipeline.plan import SetPlan
from style_aligned.pipeline.solvers import SOLVERS, SPACINGS, UNET_SOLVERS, SolverName, Spacing

DEFAULT_SIZE: dict[ModelKind, int] = {"sdxl": 1024, "sd1": 512, "flux_dev": 1024, "flux_schnell": 1024}
"""The image size of the reference examples (SD1, SDXL) and of `FluxPipeline`, in pixels (square)."""
DEFAULT_GUIDANCE: dict[ModelKind, float | None] = {"sdxl": 5.0, "sd1": 7.5, "flux_dev": 3.5, "flux_schnell": None}
"""The classifier-free guidance scale of the reference examples; FLUX.1 [dev]'s guidance embedding value as
`FluxPipeline` gives it; none for FLUX.1 [schnell], which has no guidance embedding."""
DEFAULT_STEPS: dict[ModelKind, int] = {"sdxl": 50, "sd1": 50, "flux_dev": 28, "flux_schnell": 4}
"""The denoising steps of the reference examples, of `FluxPipeline` for [dev], and of [schnell] as its authors run
it."""
DEFAULT_SOLVER: dict[ModelKind, SolverName] = {
    "sdxl": "ddim",
    "sd1": "ddim",
    "flux_dev": "flow_euler",
    "flux_schnell": "flow_euler",
}
"""The solver of the reference examples (DDIM), and FLUX.1's flow-matching Euler solver."""
SIZE_MULTIPLE: dict[ModelKind, int] = {"sdxl": 8, "sd1": 8, "flux_dev": 16, "flux_schnell": 16}
"""Image sizes are multiples of this: the autoencoder's factor (8), times 2 for FLUX.1's 2x2 packed latents."""


@dataclass(kw_only=True)
class SetSpec:
    """A style-consistent set to generate.

    Attributes:
        prompts: One prompt per image. Without `reference_prompt` or `reference_prompts`, the first is the reference.
        reference_prompt: The prompt of an extra reference image placed before the others.
        reference_prompts: The prompts of several reference images placed before the others, whose styles the
            targets blend (instead of `reference_prompt`).
        reference_weights: One relative weight per reference (default: equal); see `ReferenceCache.mixture_weights`.
        negative_prompt: The negative prompt of every image.
        seed: The seed of the initial noise (image `i` gets the `i`-th draw, whatever the chunk size), and of the noise
            a stochastic solver draws for each image (see `style_aligned.pipeline.solvers.image_seed`).
        steps: The number of denoising steps (default: see `DEFAULT_STEPS`).
        guidance: The classifier-free guidance scale (default: 5 for SDXL, 7.5 for SD1, as in the reference examples).
            At or below 1 the set runs without classifier-free guidance: one batch half, the conditional one. With a
            model that has an LCM guidance embedding (Refiners' `SDXLLcmAdapter`), it goes to the embedding instead,
            and so it does with FLUX.1 [dev] (default 3.5); FLUX.1 [schnell] takes none.
        width: The image width in pixels, a multiple of 8, of 16 for FLUX.1 (default: 1024 for SDXL and FLUX.1, 512
            for SD1).
        height: The image height in pixels, a multiple of 8 (default: as `width`).
        chunk_size: How many targets run together (default: all); memory does not grow with the set beyond it.
        style: How the images share the reference's style; options left to the model kind take its defaults.
        controls: ControlNets guiding the targets, each with one control image for all targets or one per target.
        loras: LoRAs applied while the set is generated.
        ip_adapter: An IP-Adapter image prompt for every image.
        solver: `"ddim"` (the reference examples' DDIM, exact to diffusers, the default), `"dpm"` (DPM-Solver++ 2M),
            `"euler"` or `"lcm"` (see `style_aligned.pipeline.solvers.make_solver`); `"flow_euler"`, FLUX.1's own and
            only solver.
        timestep_spacing: `"leading"`, `"trailing"` or `"linspace"` (default: the solver's own; DDIM's is leading).
    """

    prompts: list[str] = setting(help="one prompt per image")
    reference_prompt: str | None = setting(None, help="prompt of an extra reference image placed first")
    reference_prompts: list[str] | None = setting(
        None, help="prompts of several reference images placed first, whose styles the targets blend"
    )
    reference_weights: list[float] | None = setting(
        None, help="relative weight of each reference, in order (default: equal); a log-weight on its logits"
    )
    negative_prompt: str = setting("", help="negative prompt of every image")
    seed: int = setting(0, help="seed of the initial noise (image i gets its i-th draw)")
    steps: int | None = setting(None, help="denoising steps (default: 50 SD1 and SDXL, 28 FLUX.1 [dev], 4 [schnell])")
    guidance: float | None = setting(
        None,
        help="classifier-free guidance (default: 5 SDXL, 7.5 SD1; 1 or less: none); FLUX.1 [dev]: the value of its"
        " guidance embedding (default 3.5)",
    )
    width: int | None = setting(
        None, help="image width in pixels, a multiple of 8, of 16 for FLUX.1 (default: 1024 SDXL and FLUX.1, 512 SD1)"
    )
    height: int | None = setting(None, help="image height in pixels, a multiple of 8 (default: as the width)")
    chunk_size: int | None = setting(None, help="targets per batch (default: all)")
    style: StyleAlignedOptions = setting(
        help="how the images share the reference's style (StyleAligned options)", factory=StyleAlignedOptions
    )
    controls: list[ControlSpec] = setting(help="ControlNets guiding the targets", factory=lambda: [])
    loras: list[LoraSpec] = setting(help="LoRAs applied while the set is made", factory=lambda: [])
    ip_adapter: IPAdapterSpec | None = setting(None, help="an IP-Adapter image prompt for every image")
    solver: SolverName | None = setting(
        None,
        help="ddim (the reference examples' DDIM, the default), dpm (DPM-Solver++ 2M), euler or lcm; FLUX.1 takes only"
        " flow_euler, its own",
    )
    timestep_spacing: Spacing | None = setting(
        None, help="timesteps over the schedule (default: the solver's own; trailing for Lightning and Turbo models)"
    )

    @property
    def classifier_free_guidance(self) -> bool:
        """Whether the set runs with classifier-free guidance: a guidance scale above 1 (or not yet resolved), with a
        U-Net solver (FLUX.1, whose solver is `flow_euler`, is guidance-distilled: it never runs with it)."""
        return self.solver != "flow_euler" and (self.guidance is None or self.guidance > 1)

    @property
    def num_steps(self) -> int:
        """The denoising steps of a resolved spec (see `resolved`)."""
        if self.steps is None:
            raise ValueError("the spec's steps are left to the model: resolve the spec for a model first")
        return self.steps

    def extras(self) -> Extras:
        """The ControlNets, LoRAs and IP-Adapter of the set."""
        return Extras(controls=list(self.controls), loras=list(self.loras), ip_adapter=self.ip_adapter)

    def image_prompts(self) -> list[str]:
        """The prompt of every image, the references first."""
        if self.reference_prompts is not None:
            return [*self.reference_prompts, *self.prompts]
        return ([self.reference_prompt] if self.reference_prompt is not None else []) + list(self.prompts)

    def num_references(self) -> int:
        """The number of references, the first images of the set."""
        return len(self.reference_prompts) if self.reference_prompts is not None else 1

    def num_images(self) -> int:
        """The number of images of the set, the references included."""
        return len(self.image_prompts())

    def plan(self) -> SetPlan:
        """How the set is cut into its references and chunks of targets (see `SetPlan`)."""
        return SetPlan(self.num_images(), self.num_references(), self.chunk_size)

    def mixture_weights(self) -> tuple[float, ...]:
        """The references' weights (equal by default), normalised to sum 1.

        Raises:
            ValueError: If there is not one weight per reference, or a weight is not a number > 0.
        """
        weights = self.reference_weights
        if weights is not None and len(weights) != self.num_references():
            raise ValueError(f"give one reference weight per reference: {len(weights)} for {self.num_references()}")
        return mixture_weights(weights or [1.0] * self.num_references())

    def resolved(self, model: "Model | ModelKind") -> "SetSpec":
        """This spec with the model's defaults filled in, checked (given a model kind, its defaults: the checks need
        no model).

        Raises:
            ValueError: If a setting is out of range, or does not apply to the model's kind (see `refusals`).
        """
        kind = kind_of(model)
        if refused := self.refusals(kind):
            raise ValueError(refused[0])
        self.check(kind)  # before the defaults fill what was not given (a size or step count of 0 is an error)
        width = first_given(self.width, self.height, DEFAULT_SIZE[kind])
        height = first_given(self.height, width)
        guidance = DEFAULT_GUIDANCE[kind] if self.guidance is None else self.guidance
        spec = replace(
            self,
            width=width,
            height=height,
            guidance=guidance,
            steps=first_given(self.steps, DEFAULT_STEPS[kind]),
            solver=self.solver or DEFAULT_SOLVER[kind],
            style=self.style.resolved(kind),
        )
        return spec  # the defaults filled in pass `check`: it ran on what was given

    def refusals(self, kind: ModelKind) -> list[str]:
        """What in this spec the model kind does not take, one line each (empty if it takes everything).

        FLUX.1 is guidance-distilled and has no U-Net: it takes no negative prompt (no classifier-free guidance), no
        U-Net ControlNet, IP-Adapter or LoRA, no U-Net solver or spacing, and [schnell] no guidance value. SD1 and
        SDXL do not take FLUX.1's `flow_euler`.
        """
        if kind not in FLUX_KINDS:
            if self.solver == "flow_euler":
                return [f"flow_euler is FLUX.1's solver: SD1 and SDXL take {', '.join(UNET_SOLVERS)}"]
            return []
        name = "FLUX.1 [schnell]" if kind == "flux_schnell" else "FLUX.1"
        checks = {
            "FLUX.1 takes no negative prompt: it runs without classifier-free guidance": bool(self.negative_prompt),
            "ControlNets here are SD1 and SDXL U-Net ControlNets: FLUX.1 takes none": bool(self.controls),
            "LoRAs in sets are SD1 and SDXL U-Net LoRAs: FLUX.1 takes none in sets yet": bool(self.loras),
            "IP-Adapters are for SD1 and SDXL U-Nets: FLUX.1 takes none": self.ip_adapter is not None,
            f"FLUX.1 denoises with its own solver, flow_euler, not {self.solver}": self.solver
            not in (None, "flow_euler"),
            "timestep_spacing is for the U-Net solvers: FLUX.1 keeps its own schedule": self.timestep_spacing
            is not None,
            f"{name} has no guidance embedding: it takes no guidance": kind == "flux_schnell"
            and self.guidance is not None,
        }
        return [problem for problem, found in checks.items() if found]

    def check(self, kind: ModelKind | None = None) -> None:
        """Check every setting that can be checked without the model (the size only if given; its multiple, 8, or
        that of `kind`).

        Raises:
            ValueError: If a setting is out of range.
        """
        if not self.image_prompts():
            raise ValueError("a set needs at least one prompt")
        if self.reference_prompts is not None:
            if self.reference_prompt is not None:
                raise ValueError("give the reference as reference_prompt or reference_prompts, not both")
            if not self.reference_prompts:
                raise ValueError("reference_prompts needs at least one prompt")
            if len(self.reference_prompts) > 1 and self.controls:
                raise ValueError("ControlNets work with one reference; give a single reference prompt")
        self.mixture_weights()
        width = self.width if self.width is not None else self.height
        height = self.height if self.height is not None else width
        multiple = 8 if kind is None else SIZE_MULTIPLE[kind]
        if (
            width is not None
            and height is not None
            and (width % multiple or height % multiple or min(width, height) < 8)
        ):
            model = " for FLUX.1" if multiple == 16 else ""
            raise ValueError(f"the image size must be multiples of {multiple} pixels{model}, got {width}x{height}")
        if self.steps is not None and self.steps < 1:
            raise ValueError(f"steps must be at least 1, got {self.steps}")
        if self.chunk_size is not None and self.chunk_size < 1:
            raise ValueError(f"chunk_size must be at least 1, got {self.chunk_size}")
        if self.guidance is not None and not self.guidance >= 0:
            raise ValueError(f"the guidance scale must be a number >= 0, got {self.guidance}")
        if self.solver is not None and self.solver not in SOLVERS:
            raise ValueError(f"unknown solver {self.solver!r}: choose one of {', '.join(SOLVERS)}")
        if self.timestep_spacing is not None and self.timestep_spacing not in SPACINGS:
            raise ValueError(f"unknown timestep spacing {self.timestep_spacing!r}: choose one of {', '.join(SPACINGS)}")
        if self.solver == "lcm" and self.steps is not None and self.steps > 50:
            raise ValueError(f"the LCM solver takes at most 50 steps, got {self.steps}")
        # the StyleAligned options were checked when `style` was made (see `StyleAlignedOptions`)


def first_given(*values: int | None) -> int:
    """The first value that is not None (the last is a default)."""
    return next(value for value in values if value is not None)


@dataclass
class GeneratedSet:
    """The images of a set, the reference first, with the prompts and the settings that made them."""

    images: list[Image.Image]
    prompts: list[str]
    spec: SetSpec
