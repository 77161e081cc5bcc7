"""Reading through safetensors.safe_open after a checked header, and the atomic writer's temporary files."""

from pathlib import Path

import pytest
import torch

from style_aligned.weights.safetensors_io import SafetensorsReader, WeightsError, partial_name, write_safetensors

TENSORS = {"a": torch.randn(3, 4), "b": torch.arange(6, dtype=torch.int64), "c": torch.randn(2).half()}


def write(path: Path) -> None:
    entries = [(key, value.dtype, tuple(value.shape)) for key, value in TENSORS.items()]
    write_safetensors(path, entries, TENSORS.__getitem__, metadata={"model": "test"})


def test_written_tensors_read_back_exactly(tmp_path: Path) -> None:
    write(tmp_path / "weights.safetensors")
    with SafetensorsReader(tmp_path / "weights.safetensors") as reader:
        assert reader.keys() == list(TENSORS) and reader.metadata == {"model": "test"}
        for key, value in TENSORS.items():
            assert torch.equal(reader.read(key), value) and reader.read(key).dtype == value.dtype


def test_a_truncated_file_is_refused_before_reading(tmp_path: Path) -> None:
    path = tmp_path / "weights.safetensors"
    write(path)
    with open(path, "r+b") as file:
        file.truncate(path.stat().st_size - 8)
    with pytest.raises(WeightsError, match="is truncated"):
        SafetensorsReader(path)


def test_next_write_removes_temporary_files_left_by_a_killed_writer(tmp_path: Path) -> None:
    path = tmp_path / "weights.safetensors"
    stale = [partial_name(path), partial_name(path)]  # what a killed writer leaves
    other = partial_name(tmp_path / "other.safetensors")
    for file in [*stale, other]:
        file.write_bytes(b"half written")
    write(path)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([path.name, other.name])


def test_a_header_length_whose_first_byte_is_0x80_is_not_taken_for_a_pickle(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    path = tmp_path / "model.safetensors"
    for length in range(1, 400):  # find a file whose header is 0x..80 bytes long
        save_file({"x" * length: torch.zeros(1)}, str(path))
        if path.read_bytes()[0] == 0x80:
            break
    assert path.read_bytes()[0] == 0x80
    with SafetensorsReader(path) as reader:
        assert torch.equal(reader.read(reader.keys()[0]), torch.zeros(1))
