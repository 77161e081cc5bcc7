"""Checked, streaming reading and atomic writing of `.safetensors` files; pickle files are refused, never opened.

The reader parses and validates the header (sizes, offsets, dtypes) before any tensor is read, then reads one tensor
at a time through `safetensors.safe_open` (memory-mapped), so a whole model never needs to sit in memory twice. The
writer, which the library lacks, streams tensors to a temporary file beside the destination and renames it only once
complete; temporary files left by a killed writer are removed the next time the same destination is written.
"""

import glob
import json
import math
import os
import uuid
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from io import BufferedReader
from pathlib import Path
from types import TracebackType
from typing import Any

import torch
from safetensors import safe_open
from torch import Tensor

DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
CODES: dict[torch.dtype, str] = {dtype: code for code, dtype in DTYPES.items()}
PICKLE_SUFFIXES = (".bin", ".ckpt", ".pt", ".pth", ".pkl")
_MAX_HEADER = 100 * 1024 * 1024


class WeightsError(ValueError):
    """A weights file or folder that cannot be used, with the reason."""


def pickle_error(path: Path) -> WeightsError:
    """The error for a pickle checkpoint, which is never loaded: it can run arbitrary code."""
    target = (
        path.with_suffix(".safetensors")
        if path.suffix != ".safetensors"
        else path.with_suffix(".converted.safetensors")
    )
    return WeightsError(
        f"{path} is a pickle checkpoint, which style-aligned never loads (unpickling can run arbitrary code):"
        ' convert it to safetensors in an environment you trust, e.g. python -c "import torch, safetensors.torch as'
        f" st; st.save_file(torch.load('{path}', weights_only=True), '{target}')\" (for a diffusers folder, save it"
        " again with save_pretrained(..., safe_serialization=True))"
    )


@dataclass(frozen=True, kw_only=True)
class TensorInfo:
    """Where one tensor lies in a safetensors file: its dtype, shape and byte range in the data section."""

    dtype: torch.dtype
    shape: tuple[int, ...]
    begin: int
    end: int


class SafetensorsReader:
    """A validated safetensors file, read one tensor at a time.

    Example:
        ```py
        with SafetensorsReader(path) as reader:
            for key in reader.keys():
                tensor = reader.read(key)
        ```
    """

    def __init__(self, path: Path | str) -> None:
        """Open a file and validate its header.

        Raises:
            WeightsError: If the file is missing, a pickle file, truncated or not a valid safetensors file.
        """
        self.path = Path(path)
        if self.path.suffix in PICKLE_SUFFIXES:
            raise pickle_error(self.path)
        if not self.path.is_file():
            raise WeightsError(f"{self.path} does not exist")
        size = self.path.stat().st_size
        self._file: BufferedReader = open(self.path, "rb")  # noqa: SIM115 (closed below)
        try:
            self.metadata, self.tensors = self._read_header(size)
        finally:
            self._file.close()
        try:
            self._handle: Any = safe_open(str(self.path), framework="pt")  # pyright: ignore[reportUnknownMemberType]
        except Exception as error:  # safetensors raises its own SafetensorError
            raise WeightsError(f"{self.path} is not a valid safetensors file ({error})") from None

    def _read_header(self, size: int) -> tuple[dict[str, str], dict[str, TensorInfo]]:
        start = self._file.read(9)
        if (start[:2] == b"PK" or start[:1] == b"\x80") and start[8:9] != b"{":  # a header length can start with 0x80
            raise pickle_error(self.path)
        start = start[:8]
        if len(start) < 8:
            raise WeightsError(f"{self.path} is not a safetensors file: it is only {size} bytes long")
        header_size = int.from_bytes(start, "little")
        if header_size > min(size - 8, _MAX_HEADER):
            raise WeightsError(f"{self.path} is not a valid safetensors file (truncated or corrupt header)")
        try:
            self._file.seek(8)
            header: dict[str, Any] = json.loads(self._file.read(header_size))
            metadata: dict[str, str] = header.pop("__metadata__", None) or {}
            tensors = {key: self._tensor_info(key, entry) for key, entry in header.items()}
        except (ValueError, TypeError, KeyError, AttributeError) as error:
            raise WeightsError(f"{self.path} is not a valid safetensors file (corrupt header: {error})") from None
        self._data_start = 8 + header_size
        data_size = size - self._data_start
        position = 0
        for key, info in sorted(tensors.items(), key=lambda item: item[1].begin):
            if info.begin < position:
                raise WeightsError(f"{self.path} is corrupt: tensor {key} overlaps another")
            position = info.end
        if position > data_size:
            raise WeightsError(
                f"{self.path} is truncated: its tensors need {position} bytes of data but the file holds {data_size}"
            )
        return metadata, tensors

    @staticmethod
    def _tensor_info(key: str, entry: dict[str, Any]) -> TensorInfo:
        dtype = DTYPES[entry["dtype"]]
        shape = tuple(int(n) for n in entry["shape"])
        begin, end = (int(n) for n in entry["data_offsets"])
        if end - begin != math.prod(shape) * dtype.itemsize or begin < 0:
            raise ValueError(f"tensor {key} has {end - begin} bytes for shape {list(shape)} of {entry['dtype']}")
        return TensorInfo(dtype=dtype, shape=shape, begin=begin, end=end)

    def keys(self) -> list[str]:
        """The tensor names, in file order."""
        return list(self.tensors)

    def read(self, key: str) -> Tensor:
        """Read one tensor into a new CPU tensor."""
        if key not in self.tensors:
            raise KeyError(key)
        try:
            return self._handle.get_tensor(key)
        except Exception as error:  # a file changed or cut short since it was opened
            raise WeightsError(f"{self.path}: tensor {key} could not be read ({error})") from None

    def close(self) -> None:
        self._handle = None

    def __enter__(self) -> "SafetensorsReader":
        return self

    def __exit__(self, *_: type[BaseException] | BaseException | TracebackType | None) -> None:
        self.close()


def read_tensors(path: Path | str) -> dict[str, Tensor]:
    """Read every tensor of a `.safetensors` file (pickle files are refused)."""
    with SafetensorsReader(path) as reader:
        return {key: reader.read(key) for key in reader.keys()}


def partial_name(path: Path) -> Path:
    """A new temporary name beside `path`, for writing it atomically (`.NAME.XXXXXXXX.partial`)."""
    return path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.partial")


def remove_stale_partials(path: Path) -> None:
    """Remove the temporary files that an interrupted write of `path` left behind (see `partial_name`)."""
    if not path.parent.is_dir():
        return
    for stale in path.parent.glob(f".{glob.escape(path.name)}.*.partial"):
        try:
            stale.unlink(missing_ok=True)
        except OSError as error:
            warnings.warn(f"could not remove the stale temporary file {stale}: {error}", stacklevel=2)


def write_safetensors(
    path: Path,
    entries: Iterable[tuple[str, torch.dtype, tuple[int, ...]]],
    produce: Callable[[str], Tensor],
    *,
    metadata: dict[str, str] | None = None,
) -> None:
    """Write a safetensors file by streaming its tensors, atomically.

    The file is written under a temporary name beside `path` and renamed to `path` once complete: an interrupted or
    failed write leaves nothing at `path`.

    Args:
        path: The file to write.
        entries: The name, dtype and shape of every tensor, in the order they are written.
        produce: Returns the tensor of a name, when it is written (so that only one is in memory at a time).
        metadata: Text metadata stored in the header.
    """
    remove_stale_partials(path)
    entries = list(entries)
    header: dict[str, Any] = {"__metadata__": metadata or {}}
    offset = 0
    for key, dtype, shape in entries:
        size = math.prod(shape) * dtype.itemsize
        header[key] = {"dtype": CODES[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    header_bytes = json.dumps(header, separators=(",", ":")).encode()
    header_bytes += b" " * (-len(header_bytes) % 8)
    temporary = partial_name(path)
    try:
        with open(temporary, "wb") as file:
            file.write(len(header_bytes).to_bytes(8, "little"))
            file.write(header_bytes)
            for key, dtype, shape in entries:
                tensor = produce(key)
                if tensor.dtype != dtype or tuple(tensor.shape) != shape:
                    raise WeightsError(
                        f"tensor {key} is {tensor.dtype} {list(tensor.shape)}, not {dtype} {list(shape)}"
                    )
                file.write(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().data)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
