"""What a set is: `SetSpec`, its defaults per model kind, and the images it makes (`GeneratedSet`)."""

from dataclasses import dataclass, replace

from PIL import Image
from refiners.foundationals.latent_diffusion.solvers import Solver

from style_aligned.layers.reference_cache import mixture_weights
from style_aligned.options import ModelKind, StyleAlignedOptions, model_kind, setting
from style_aligned.pipeline.composition import ControlSpec, Extras, IPAdapterSpec, LoraSpec
from style_aligned.pipeline.model import StableDiffusion
from style_aligned.pipeline.plan import SetPlan
from style_aligned.pipeline.solvers import SOLVERS, SPACINGS, SolverName, Spacing, make_solver

DEFAULT_SIZE: dict[ModelKind, int] = {"sdxl": 1024, "sd1": 512}
"""The image size of the reference examples, in pixels (square)."""
DEFAULT_GUIDANCE: dict[ModelKind, float] = {"sdxl": 5.0, "sd1": 7.5}
"""The classifier-free guidance scale of the reference examples."""
DEFAULT_STEPS = 50
"""The denoising steps of the reference examples."""


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
        steps: The number of denoising steps.
        guidance: The classifier-free guidance scale (default: 5 for SDXL, 7.5 for SD1, as in the reference examples).
            At or below 1 the set runs without classifier-free guidance: one batch half, the conditional one. With a
            model that has an LCM guidance embedding (Refiners' `SDXLLcmAdapter`), it goes to the embedding instead.
        width: The image width in pixels, a multiple of 8 (default: 1024 for SDXL, 512 for SD1).
        height: The image height in pixels, a multiple of 8 (default: as `width`).
        chunk_size: How many targets run together (default: all); memory does not grow with the set beyond it.
        style: How the images share the reference's style; options left to the model kind take its defaults.
        controls: ControlNets guiding the targets, each with one control image for all targets or one per target.
        loras: LoRAs applied while the set is generated.
        ip_adapter: An IP-Adapter image prompt for every image.
        solver: `"ddim"` (the reference examples' DDIM, exact to diffusers), `"dpm"` (DPM-Solver++ 2M), `"euler"` or
            `"lcm"`; see `style_aligned.pipeline.solvers.make_solver`.
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
    steps: int = setting(DEFAULT_STEPS, help="denoising steps")
    guidance: float | None = setting(
        None, help="classifier-free guidance (default: 5 SDXL, 7.5 SD1); 1 or less: no classifier-free guidance"
    )
    width: int | None = setting(None, help="image width in pixels, a multiple of 8 (default: 1024 SDXL, 512 SD1)")
    height: int | None = setting(None, help="image height in pixels, a multiple of 8 (default: as the width)")
    chunk_size: int | None = setting(None, help="targets per batch (default: all)")
    style: StyleAlignedOptions = setting(
        help="how the images share the reference's style (StyleAligned options)", factory=StyleAlignedOptions
    )
    controls: list[ControlSpec] = setting(help="ControlNets guiding the targets", factory=lambda: [])
    loras: list[LoraSpec] = setting(help="LoRAs applied while the set is made", factory=lambda: [])
    ip_adapter: IPAdapterSpec | None = setting(None, help="an IP-Adapter image prompt for every image")
    solver: SolverName = setting(
        "ddim", help="ddim (the reference examples' DDIM), dpm (DPM-Solver++ 2M), euler or lcm"
    )
    timestep_spacing: Spacing | None = setting(
        None, help="timesteps over the schedule (default: the solver's own; trailing for Lightning and Turbo models)"
    )

    @property
    def classifier_free_guidance(self) -> bool:
        """Whether the set runs with classifier-free guidance: a guidance scale above 1 (or not yet resolved)."""
        return self.guidance is None or self.guidance > 1

    def make_solver(self, sd: StableDiffusion) -> Solver:
        """A fresh solver of this set for the model's device and dtype."""
        return make_solver(self.solver, self.steps, spacing=self.timestep_spacing, device=sd.device, dtype=sd.dtype)

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

    def resolved(self, sd: "StableDiffusion | ModelKind") -> "SetSpec":
        """This spec with the model's defaults filled in, checked (given a model kind, its defaults: the checks need
        no model).

        Raises:
            ValueError: If a setting is out of range.
        """
        kind = sd if isinstance(sd, str) else model_kind(sd)
        width = self.width or self.height or DEFAULT_SIZE[kind]
        height = self.height or width
        guidance = DEFAULT_GUIDANCE[kind] if self.guidance is None else self.guidance
        spec = replace(self, width=width, height=height, guidance=guidance, style=self.style.resolved(kind))
        spec.check()
        return spec

    def check(self) -> None:
        """Check every setting that can be checked without the model (the size only if given).

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
        width, height = self.width or self.height, self.height or self.width
        if width is not None and height is not None and (width % 8 or height % 8 or width < 8 or height < 8):
            raise ValueError(f"the image size must be multiples of 8 pixels, got {width}x{height}")
        if self.steps < 1:
            raise ValueError(f"steps must be at least 1, got {self.steps}")
        if self.chunk_size is not None and self.chunk_size < 1:
            raise ValueError(f"chunk_size must be at least 1, got {self.chunk_size}")
        if self.guidance is not None and not self.guidance >= 0:
            raise ValueError(f"the guidance scale must be a number >= 0, got {self.guidance}")
        if self.solver not in SOLVERS:
            raise ValueError(f"unknown solver {self.solver!r}: choose one of {', '.join(SOLVERS)}")
        if self.timestep_spacing is not None and self.timestep_spacing not in SPACINGS:
            raise ValueError(f"unknown timestep spacing {self.timestep_spacing!r}: choose one of {', '.join(SPACINGS)}")
        if self.solver == "lcm" and self.steps > 50:
            raise ValueError(f"the LCM solver takes at most 50 steps, got {self.steps}")
        # the StyleAligned options were checked when `style` was made (see `StyleAlignedOptions`)


@dataclass
class GeneratedSet:
    """The images of a set, the reference first, with the prompts and the settings that made them."""

    images: list[Image.Image]
    prompts: list[str]
    spec: SetSpec
