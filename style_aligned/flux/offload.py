"""Model CPU offload: only the models a stage uses are on the accelerator, the others wait in CPU memory.

FLUX.1 does not fit most GPUs whole (24 GB for the transformer in bfloat16, 9.5 GB for T5-XXL): a generation uses
the text encoders first, then the transformer for every step, then the autoencoder, so each can have the GPU to
itself. A model stays on the accelerator after its stage until a stage that does not use it begins, so the
transformer is moved once per set, not once per step.
"""

from collections.abc import Callable, Generator, Mapping
from contextlib import contextmanager

import torch
from torch import nn


def _move(module: nn.Module, device: torch.device) -> None:
    module.to(device=device)


class ModelOffload:
    """Keeps only the models in use on the accelerator.

    Example:
        ```py
        offload = ModelOffload({"t5": t5, "transformer": transformer, "autoencoder": ae}, device="cuda")
        with offload.use("t5"):
            embedding = t5(prompts)
        with offload.use("transformer"):  # T5 goes back to the CPU first
            ...
        ```

    Attributes:
        models: The models, by name.
        device: The accelerator.
        offload_device: Where the models wait (the CPU).
        on_device: The names of the models on the accelerator now.
        stages: The names of the models on the accelerator at each stage entered so far, in order.
    """

    def __init__(
        self,
        models: Mapping[str, nn.Module],
        *,
        device: torch.device | str,
        offload_device: torch.device | str = "cpu",
        move: Callable[[nn.Module, torch.device], None] = _move,
    ) -> None:
        """Place every model on the offload device.

        Args:
            models: The models, by name.
            device: The accelerator the models run on.
            offload_device: Where the models wait.
            move: Moves a model to a device (by default `module.to(device)`).
        """
        self.models = dict(models)
        self.device, self.offload_device = torch.device(device), torch.device(offload_device)
        self._move = move
        self.on_device: set[str] = set()
        self.stages: list[tuple[str, ...]] = []
        for module in self.models.values():
            self._move(module, self.offload_device)

    @contextmanager
    def use(self, *names: str) -> Generator[None]:
        """A stage: the named models on the accelerator, every other one on the offload device.

        Raises:
            KeyError: If a name is not one of the models.
        """
        if unknown := [name for name in names if name not in self.models]:
            raise KeyError(f"no model named {', '.join(unknown)} (models: {', '.join(self.models)})")
        for name in sorted(self.on_device - set(names)):
            self._move(self.models[name], self.offload_device)
        if self.on_device - set(names) and self.device.type == "cuda":
            torch.cuda.empty_cache()
        for name in names:
            if name not in self.on_device:
                self._move(self.models[name], self.device)
        self.on_device = set(names)
        self.stages.append(tuple(names))
        yield

    def offload_all(self) -> None:
        """Move every model to the offload device."""
        for name in sorted(self.on_device):
            self._move(self.models[name], self.offload_device)
        self.on_device = set()
