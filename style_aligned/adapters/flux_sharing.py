"""The layers of shared attention on FLUX.1 (AlignedGen, arXiv 2509.17088): the per-call schedule, AdaIN on the image
tokens, the rotary embedding by batch half, the reference's image keys at shifted positions, and the kernel.

A shared FLUX.1 attention receives the queries, keys and values of `[text | image]` tokens before their rotary
embedding. AdaIN maps the image tokens of every image onto the reference's (`AdaIN` on `ImageTokensOnly`), the
rotary embedding turns queries and keys (`RotaryByHalf`), and the reference's image keys and values are handed to the
targets (`GetReferences`) with the keys turned at shifted positions and scaled by lambda (`PlaceReferenceKeys`).
`FluxSharedScaledDotProductAttention` then merges each target's attention over its own tokens with its attention over
the reference's image tokens, by log-sum-exp. The step window, lambda and the reference's positions are computed once
per call from the transformer's context (`SharingSchedule`).
"""

import math
from collections.abc import Sequence
from typing import Any, cast

import refiners.fluxion.layers as fl
import torch
from jaxtyping import Float
from torch import Tensor

from style_aligned.flux.layers import FLUX_CONTEXT, apply_rotary, rotary_frequencies, text_length
from style_aligned.layers.attention import References, SharedScaledDotProductAttention, attention_with_lse
from style_aligned.layers.reference_cache import ReferenceCache
from style_aligned.options import AttentionMode, ScoreSchedule

_WINDOW_TOLERANCE = 1e-6


def window_of_steps(timesteps: Sequence[float], start: int, stop: int) -> tuple[float, float]:
    """The `shared_window` that shares the steps `start` to `stop - 1` of a schedule (AlignedGen's `timesteps` range).

    Args:
        timesteps: The timesteps of the schedule's steps, in [0, 1000], decreasing.
        start: The first shared step (0 for AlignedGen's example).
        stop: The step after the last shared one (30 of 30 steps in AlignedGen's example).

    Raises:
        ValueError: If the range is empty or outside the schedule.
    """
    if not 0 <= start < stop <= len(timesteps):
        raise ValueError(f"steps {start} to {stop} are not a range of the {len(timesteps)} steps")
    return (1 - float(timesteps[start]) / 1000, 1 - float(timesteps[stop - 1]) / 1000)


def call_timestep(module: fl.ContextModule) -> float:
    """The timestep the transformer is called with (its `diffusion` context, in [0, 1000]), one for the whole batch.

    Raises:
        ValueError: If it is not set, or differs between rows.
    """
    timestep = cast(Tensor | None, module.use_context("diffusion").get("timestep"))
    if timestep is None:
        raise ValueError("the timestep is not set: call set_timestep before the transformer")
    if timestep.numel() > 1 and not bool((timestep == timestep.reshape(-1)[0]).all()):
        raise ValueError("StyleAligned denoises a set at one timestep: got different timesteps for its rows")
    return float(timestep.reshape(-1)[0])


class SharingSchedule:
    """When the shared FLUX.1 layers share, and how: the step window, lambda, and the positions of the reference's
    keys given to the targets; one for all the layers of a `StyleAlignedAdapter`.

    The progress of a call at timestep `t` is `1 - t / 1000`; outside the window there is no lambda and the shared
    layers run plain attention. The reference's rotary frequencies are computed once for the image ids of a call and
    kept while the ids do not change.
    """

    def __init__(
        self,
        *,
        window: tuple[float, float],
        scale: float | None,
        schedule: ScoreSchedule,
        shifted_positions: bool,
        axes_dims: tuple[int, ...],
        theta: int,
    ) -> None:
        """Initialize the schedule.

        Args:
            window: The shared part of the denoising, `(start, end)` fractions of the way from noise to image.
            scale: Lambda in the fixed schedule (`shared_score_scale`).
            schedule: `"fixed"` or `"decrease"` (`(t / 1000)^2`).
            shifted_positions: Whether the reference's keys sit to the right of the image (columns + width).
            axes_dims: The transformer's rotary axes.
            theta: The transformer's rotary base.
        """
        self.window, self.scale, self.schedule = window, scale, schedule
        self.shifted_positions, self.axes_dims, self.theta = shifted_positions, axes_dims, theta
        self._rotary: tuple[Tensor, Tensor] | None = None  # (image ids, frequencies)

    def key_scale(self, timestep: float) -> float | None:
        """Lambda at this timestep, or `None` outside the window."""
        progress = 1 - timestep / 1000
        start, end = self.window
        if not start - _WINDOW_TOLERANCE <= progress <= end + _WINDOW_TOLERANCE:
            return None
        if self.schedule == "decrease":
            return (timestep / 1000) ** 2
        return 1.0 if self.scale is None else self.scale

    def reference_ids(self, image_ids: Float[Tensor, "tokens 3"]) -> Float[Tensor, "tokens 3"]:
        """The ids of the reference's image tokens as the targets see them: moved right by the image's width in
        tokens (AlignedGen's ShiftPE), or their own."""
        if not self.shifted_positions:
            return image_ids
        shifted = image_ids.clone()
        shifted[:, 2] += image_ids[:, 2].max() + 1
        return shifted

    def reference_rotary(self, image_ids: Float[Tensor, "tokens 3"]) -> Float[Tensor, "2 tokens head_dim"]:
        """The rotary frequencies of the reference's image keys given to the targets (see `reference_ids`)."""
        if self._rotary is None or not _same(self._rotary[0], image_ids):
            frequencies = rotary_frequencies(self.reference_ids(image_ids), self.axes_dims, self.theta)
            self._rotary = (image_ids.clone(), frequencies)
        return self._rotary[1]


def _same(a: Tensor, b: Tensor) -> bool:
    return a.shape == b.shape and a.device == b.device and bool(torch.equal(a, b))


class ImageTokensOnly(fl.Chain):
    """Apply layers to the image tokens of a joint sequence by half, leaving its text tokens as they are.

    Receives:
        (Float[Tensor, "halves images_per_half text+image channels"]):

    Returns:
        (Float[Tensor, "halves images_per_half text+image channels"]):
    """

    def forward(self, *args: Any) -> Tensor:
        x: Tensor = args[0]
        length = text_length(self)
        image = cast(Tensor, super().forward(x[:, :, length:]))
        return torch.cat((x[:, :, :length], image), dim=2)


class ImageTokensByHalf(fl.ContextModule):
    """Keep the image tokens of a joint sequence by half.

    Receives:
        (Float[Tensor, "halves images_per_half text+image channels"]):

    Returns:
        (Float[Tensor, "halves images_per_half image channels"]): A view.
    """

    def forward(self, x: Tensor) -> Tensor:
        return x[:, :, text_length(self) :]


class RotaryByHalf(fl.ContextModule):
    """Apply the rotary embedding of the call's `[text | image]` tokens to queries or keys laid out by half.

    Receives:
        (Float[Tensor, "halves images_per_half tokens channels"]):

    Returns:
        (Float[Tensor, "halves images_per_half tokens channels"]):
    """

    def forward(self, x: Tensor) -> Tensor:
        frequencies = cast(Tensor | None, self.use_context(FLUX_CONTEXT).get("rotary"))
        if frequencies is None or frequencies.shape[1] != x.shape[-2]:
            raise ValueError("the rotary frequencies are not set for these tokens")
        return apply_rotary(x, frequencies)


class PlaceReferenceKeys(fl.ContextModule):
    """Turn the reference's image keys given to the targets at their positions and scale them by lambda (see
    `SharingSchedule`), on one copy per half shared by all images.

    On FLUX.1 the references never attend to these keys (AlignedGen's `constrain_first`): every image is given the
    same scaled copy, and only the targets read it.

    Receives:
        (Float[Tensor, "halves images_per_half references*image channels"]): The references' image keys each image is
            given (`GetReferences`: a broadcast view), before the rotary embedding.

    Returns:
        (Float[Tensor, "halves images_per_half references*image channels"]): Turned and scaled, a broadcast view of
            one copy per half.
    """

    def __init__(self, schedule: SharingSchedule) -> None:
        """Initialize the layer.

        Args:
            schedule: The adapter's schedule (lambda and the reference's positions).
        """
        super().__init__()
        self.schedule = schedule

    def forward(self, x: Tensor) -> Tensor:
        image_ids = cast(Tensor | None, self.use_context(FLUX_CONTEXT).get("image_ids"))
        scale = self.schedule.key_scale(call_timestep(self))
        if image_ids is None or scale is None:
            raise ValueError("the image ids are not set, or the call is outside the shared steps")
        frequencies = self.schedule.reference_rotary(image_ids)
        references = x.shape[2] // frequencies.shape[1]
        keys = apply_rotary(x[:, 0], frequencies.repeat(1, references, 1))  # (halves, references * image, channels)
        if scale != 1.0:
            keys.mul_(scale)  # a fresh tensor: scaled in place
        return keys[:, None].expand_as(x)


class FluxSharedScaledDotProductAttention(SharedScaledDotProductAttention, fl.ContextModule):
    """The shared attention kernel on FLUX.1: each target attends to its own `[text | image]` tokens and to the image
    tokens of the references, the two merged by log-sum-exp; the references attend to their own tokens only.

    This is `SharedScaledDotProductAttention` (one copy of the references' keys and values per half, read by every
    target, no mask, no concatenation) with several weighted references merged one after another: reference `j`'s
    logits get `shift + log p_j`. In `swap` mode a target's own tokens are its text tokens only: its image queries and
    keys are swapped for the reference's.

    Receives:
        Query (Float[Tensor, "halves images_per_half text+image channels"]): Turned queries.
        Key (Float[Tensor, "halves images_per_half text+image channels"]): Turned keys.
        Value (Float[Tensor, "halves images_per_half text+image channels"]):
        Reference key (Float[Tensor, "halves images_per_half references*image channels"]): See `PlaceReferenceKeys`.
        Reference value (Float[Tensor, "halves images_per_half references*image channels"]):

    Returns:
        (Float[Tensor, "batch text+image channels"]):
    """

    def __init__(
        self,
        num_heads: int = 1,
        *,
        mode: AttentionMode = "concat",
        shift: float = 0.0,
        strength: float = 1.0,
        reference_cache: ReferenceCache,
    ) -> None:
        """Initialize the kernel.

        Args:
            num_heads: The number of attention heads.
            mode: `"concat"` (own and reference tokens) or `"swap"` (own text and reference image tokens).
            shift: `shared_score_shift`, added to the logits of the reference tokens.
            strength: The style strength, in [0, 1] (`concat` mode): `log strength` is added to those logits too.
            reference_cache: Tells which images are references, how many there are and their weights.
        """
        super().__init__(num_heads, shift=shift, strength=strength, reference_cache=reference_cache)
        self.mode: AttentionMode = mode

    def _attend(self, query: Tensor, key: Tensor, value: Tensor, shared: References | None) -> Tensor:
        if self.mode == "concat":
            return super()._attend(query, key, value, shared)
        halves, per_half, num_queries, channels = query.shape
        first, length = self.first_target, text_length(self)
        scale = 1 / math.sqrt(channels // self.num_heads)
        output = query.new_empty(halves, per_half, self.num_heads, num_queries, channels // self.num_heads)
        lse = query.new_empty(halves, per_half, self.num_heads, num_queries, dtype=torch.float32)
        for rows, tokens in ((slice(0, first), slice(None)), (slice(first, per_half), slice(0, length))):
            if rows.start == rows.stop:
                continue
            attended, attended_lse = attention_with_lse(
                self._heads(query[:, rows].flatten(0, 1)),
                self._heads(key[:, rows, tokens].flatten(0, 1)),
                self._heads(value[:, rows, tokens].flatten(0, 1)),
                scale=scale,
            )
            output[:, rows] = attended.unflatten(0, (halves, -1))
            lse[:, rows] = attended_lse.unflatten(0, (halves, -1))
        if shared is not None:
            self._merge_reference(output[:, first:], lse[:, first:], query[:, first:], shared, scale=scale)
        return output.transpose(2, 3).reshape(halves, per_half, num_queries, channels)

    def _merge_reference(
        self, own: Tensor, own_lse: Tensor, query: Tensor, shared: References, *, scale: float
    ) -> None:
        """Merge into `own` (in place) each target's attention over each reference's image tokens, one target and one
        reference at a time, reference `j`'s logits shifted by `shift + log strength + log p_j`.

        `own`: `(halves, targets, heads, num_queries, head_dim)`, `own_lse`: `(halves, targets, heads, num_queries)`
        (updated in place), `query`: `(halves, targets, num_queries, channels)`; `shared`: the references' keys and
        values, `(halves, references * image, channels)` each.
        """
        weights = self.reference_cache.mixture_weights
        keys = self._heads(shared[0]).chunk(len(weights), dim=-2)  # (halves, heads, image, head_dim) each
        values = self._heads(shared[1]).chunk(len(weights), dim=-2)
        for target in range(own.shape[1]):
            queries = self._heads(query[:, target])
            for key, value, weight in zip(keys, values, weights, strict=True):
                reference, reference_lse = attention_with_lse(queries, key, value, scale=scale)
                reference_lse.add_(self.reference_shift + math.log(weight))
                merged_lse = torch.logaddexp(own_lse[:, target], reference_lse)
                mix = reference_lse.sub_(merged_lse).exp_().to(own.dtype)  # the reference's share of the softmax
                own[:, target].lerp_(reference, mix[..., None])
                own_lse[:, target] = merged_lse
                del reference, reference_lse, mix
