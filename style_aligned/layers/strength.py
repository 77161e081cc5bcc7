"""The style strength `s` in [0, 1]: how far each shared layer moves from the plain model (0) to the method (1).

At strength `s`, AdaIN maps `x` to `x + s (adain(x) - x)`, the logits of the reference tokens a target is given gain
`log s` on top of `shared_score_shift` (at 0 they get no weight: the target attends to its own tokens only), and
shared GroupNorm's statistics move from the image's own to the joint ones, `own + s (joint - own)`. `s = 1` is the
method exactly (the layers take the same path as without a strength) and `s = 0` is the plain model exactly (the
layers skip their reference path). The references themselves are never changed.
"""

import math
from typing import TypeVar

from torch import Tensor

T = TypeVar("T", Tensor, float)


def check_strength(strength: float) -> float:
    """Return `strength` if it is a number in [0, 1].

    Raises:
        ValueError: Naming the problem, if it is not.
    """
    if not 0.0 <= strength <= 1.0:  # also refuses NaN
        raise ValueError(f"strength must be a number in [0, 1], got {strength}")
    return strength


def toward(own: T, shared: T, strength: float) -> T:
    """`own + strength (shared - own)`: `shared` itself at strength 1, `own` itself at strength 0.

    Args:
        own: The value of the plain model (the image's own statistics, the identity map's factor...).
        shared: The value of the method.
        strength: The style strength, in [0, 1].

    Returns:
        The value at that strength; at 1 and 0 the very object given, so that both ends are exact.
    """
    if strength == 1.0:
        return shared
    if strength == 0.0:
        return own
    return own + strength * (shared - own)


def reference_logit_shift(shift: float, strength: float) -> float:
    """What is added to the attention logits of the reference tokens given to a target: `shift + log strength`.

    Args:
        shift: `shared_score_shift`.
        strength: The style strength, in [0, 1].

    Returns:
        `shift` at strength 1, `-inf` at strength 0 (the reference tokens get no weight; kernels skip them there).
    """
    if strength == 1.0:
        return shift
    return shift + math.log(strength) if strength > 0.0 else -math.inf
