"""Reading checkpoints as data, never as code.

A checkpoint may come from elsewhere (a shared filesystem, a download, a colleague), and its CRC-32
records prove only that the bytes did not change since they were recorded, not who wrote them: anyone
can write a file and its checksums. Python's pickle runs whatever a file tells it to, so no file of a
checkpoint is ever unpickled without a restriction:

- per-rank state (`rank*.pt`): `torch.load(weights_only=True)`: tensors, numbers, strings, lists,
  tuples and dicts only (`load_plain`);
- DCP's `.metadata`, a pickle torch itself reads without restriction: `SafeReader.read_metadata`
  admits only the classes DCP's metadata is made of (`_ALLOWED`), and every storage record must name a
  plain file inside the checkpoint directory;
- DCP's non-tensor items (the optimizer's hyperparameters), which torch's default planner unpickles
  without restriction: `SafePlanner.load_bytes` reads them with `weights_only=True`.

Anything else in a file is refused with `UnsafeCheckpointError`, naming the file and the object.
"""
from __future__ import annotations

import io
import pickle
from pathlib import Path, PurePath
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import metadata as dcp_metadata
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner


class UnsafeCheckpointError(RuntimeError):
    """A checkpoint file holds something other than tensors and plain data: refused, never run."""


def _metadata_classes() -> dict[tuple[str, str], Any]:
    from torch.distributed.checkpoint.filesystem import _StorageInfo

    allowed: dict[tuple[str, str], Any] = {
        (dcp_metadata.__name__, name): getattr(dcp_metadata, name)
        for name in (*dcp_metadata.__all__, "_MEM_FORMAT_ENCODING") if hasattr(dcp_metadata, name)}
    allowed[("torch.distributed.checkpoint.filesystem", "_StorageInfo")] = _StorageInfo
    allowed[("torch", "Size")] = torch.Size
    allowed[("torch.serialization", "_get_layout")] = torch.serialization._get_layout  # a name -> layout lookup
    # The checkpoint's path as DCP recorded it (StorageMeta.checkpoint_id): constructing one runs nothing.
    for cls in (PurePath, Path, type(Path()), type(PurePath())):
        allowed[("pathlib", cls.__name__)] = cls
    return allowed


_ALLOWED = _metadata_classes()
_TORCH_VALUES = (torch.dtype, torch.layout, torch.memory_format)  # torch.float32 etc.: constants


class _MetadataUnpickler(pickle.Unpickler):
    def __init__(self, file, source: Path):
        super().__init__(file)
        self.source = source

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _ALLOWED:
            return _ALLOWED[(module, name)]
        if module == "torch" and isinstance(getattr(torch, name, None), _TORCH_VALUES):
            return getattr(torch, name)
        raise UnsafeCheckpointError(
            f"{self.source} refers to {module}.{name}, which a DCP checkpoint's metadata never holds: refused "
            "unread (a crafted or foreign file; a checkpoint is data, never code). Use a checkpoint this "
            "toolkit wrote")


def read_metadata_file(path: Path) -> dcp_metadata.Metadata:
    """DCP's `.metadata` file through the restricted unpickler, checked to be a Metadata whose storage
    records name files of its own directory."""
    try:
        with open(path, "rb") as f:
            metadata = _MetadataUnpickler(f, path).load()
    except UnsafeCheckpointError:
        raise
    except Exception as err:  # truncated or foreign bytes
        raise UnsafeCheckpointError(f"{path} is not a DCP metadata file ({type(err).__name__}: {err})") from None
    if not isinstance(metadata, dcp_metadata.Metadata):
        raise UnsafeCheckpointError(f"{path} holds a {type(metadata).__name__}, not DCP metadata: refused")
    for info in (metadata.storage_data or {}).values():
        name = str(getattr(info, "relative_path", ""))
        if not name or "/" in name or "\\" in name or name in (".", ".."):
            raise UnsafeCheckpointError(f"{path} points a storage record at {name!r}, outside its checkpoint "
                                        "directory: refused")
    return metadata


class SafeReader(dcp.FileSystemReader):
    """DCP's file-system reader with `.metadata` read by `read_metadata_file`, once. Call
    `read_metadata()` before handing it to `dcp.load`: inside, DCP logs a refusal as a traceback and
    goes looking for per-rank metadata files this toolkit never writes."""

    _metadata: dcp_metadata.Metadata | None = None

    def read_metadata(self, *args: Any, **kwargs: Any) -> dcp_metadata.Metadata:
        if kwargs.get("rank") is not None:
            raise UnsafeCheckpointError(f"{self.path} has no per-rank metadata (this toolkit writes none)")
        if self._metadata is None:
            self._metadata = read_metadata_file(Path(self.path) / ".metadata")
        metadata = self._metadata
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = dcp_metadata.StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


class SafePlanner(DefaultLoadPlanner):
    """DCP's default load planner whose non-tensor items are read with `weights_only=True`; what torch's
    own reading then sees is that value saved again by this process."""

    def load_bytes(self, read_item, value: io.BytesIO) -> None:
        where = f"{getattr(read_item.dest_index, 'fqn', '?')} of the checkpoint"
        plain = _weights_only(value, where)
        again = io.BytesIO()
        torch.save(plain, again)
        again.seek(0)
        super().load_bytes(read_item, again)


def _weights_only(source, what: str) -> Any:
    try:
        return torch.load(source, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:  # weights_only refusals are UnpicklingErrors
        # torch's message: advice to lift the restriction (never here), then the object refused.
        lines = [line for line in str(err).splitlines() if "GLOBAL" in line or "Unsupported" in line]
        found = lines[0].strip() if lines else type(err).__name__
        raise UnsafeCheckpointError(f"{what} holds objects other than tensors and plain data ({found[:200]}): "
                                    "refused unread (a checkpoint is data, never code)") from None


def load_plain(path: Path, allow: tuple = ()) -> Any:
    """`torch.load(path, weights_only=True)`; `allow`: extra classes torch's restricted unpickler may
    build (numpy arrays of older per-rank files). UnsafeCheckpointError for anything else."""
    with torch.serialization.safe_globals(list(allow)):
        return _weights_only(path, str(path))


def numpy_array_classes() -> tuple:
    """What a pickled numpy array of numbers is made of (per-rank files of checkpoint format 2 hold the
    numpy RNG state so): building one runs no code of the file's choosing."""
    try:
        import numpy as np
    except ImportError:
        return ()
    core = getattr(np, "_core", None) or np.core
    return (core.multiarray._reconstruct, np.ndarray, np.dtype,
            *(getattr(np.dtypes, n) for n in ("UInt32DType", "Int64DType") if hasattr(np, "dtypes")))
