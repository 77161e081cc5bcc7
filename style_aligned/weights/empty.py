"""Models built empty: on the meta device, without running their initialisation, to receive their weights later.

A model built under `torch.device("meta")` allocates nothing, but its layers still run their initialisers on the
meta tensors. Most are cheap there; `normal_` is not: on the meta device torch runs its reference implementation,
whose first call imports `torch._dynamo` (about 1.7 s, paid once per process, by the two embeddings of a CLIP text
encoder for instance). Under `empty_init` the initialisers of meta tensors do nothing, so building a model costs only
its Python construction.
"""

from collections.abc import Callable, Generator
from contextlib import contextmanager
from typing import Any, TypeVar

import torch
from torch import Tensor
from torch.nn import init
from torch.overrides import TorchFunctionMode

M = TypeVar("M", bound=torch.nn.Module)

_INITIALISERS: frozenset[Callable[..., Any]] = frozenset(
    {
        init.uniform_,
        init.normal_,
        init.trunc_normal_,
        init.constant_,
        init.ones_,
        init.zeros_,
        init.eye_,
        init.dirac_,
        init.xavier_uniform_,
        init.xavier_normal_,
        init.kaiming_uniform_,
        init.kaiming_normal_,
        init.orthogonal_,
        init.sparse_,
        Tensor.normal_,
        Tensor.uniform_,
    }
)


class _SkipMetaInitialisation(TorchFunctionMode):
    """Turns the initialisers of `torch.nn.init` (and `Tensor.normal_`, `Tensor.uniform_`) of meta tensors into
    no-ops; every other call, and the initialisation of tensors on other devices, runs as usual."""

    def __torch_function__(
        self,
        func: Callable[..., Any],
        types: Any,
        args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> Any:
        kwargs = kwargs or {}
        if func in _INITIALISERS:
            tensor = args[0] if args else kwargs.get("tensor")
            if isinstance(tensor, Tensor) and tensor.is_meta:
                return tensor
        return func(*args, **kwargs)


@contextmanager
def empty_init() -> Generator[None]:
    """Build modules on the meta device, without initialisation: every tensor is to be loaded by assignment.

    Example:
        ```py
        with empty_init():
            unet = SDXLUNet(in_channels=4)
        unet.load_state_dict(tensors, assign=True)
        ```
    """
    with torch.device("meta"), _SkipMetaInitialisation():
        yield


def build_empty(factory: Callable[[], M]) -> M:
    """Build a model under `empty_init`: on the meta device, no memory allocated, no initialiser run.

    Args:
        factory: Builds the model.

    Returns:
        The model, every parameter and buffer on the meta device.
    """
    with empty_init():
        return factory()
