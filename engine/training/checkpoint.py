"""Training checkpoints and exported model weights: safetensors plus json, never pickle.

A training checkpoint is a directory (DESIGN.md, "Rules of the design")::

    <checkpoint>/
      MANIFEST.json              {"format", "version", "files": {file: {"sha256", "bytes"}}}
      state.json                 training state: epoch, step, metrics, seeds ... (json)
      config.json                the run/model config the weights belong to (json)
      <model>.safetensors        one per model: the bare module's state_dict (DDP/compile unwrapped)
      optim-<name>.safetensors   the optimizer's tensors, keyed by their path in its state_dict
                                 (``state.<param_index>.<key>``, e.g. ``state.0.exp_avg``)
      optim-<name>.json          the rest of its state_dict: param_groups and non-tensor state
      sched-<name>.json          an LR scheduler's state_dict (+ sched-<name>.safetensors if it
                                 holds tensors)

It is written into a temporary sibling directory and renamed into place, so a reader sees either
the old checkpoint or the complete new one. Loading reads only ``.safetensors`` and ``.json``,
verifies every file against the manifest's sha256 first, and refuses a directory holding any
pickle-style file (``.pt``, ``.pth``, ``.bin``, ``.pkl``, ``.pickle``, ``.ckpt``): unpickling runs
arbitrary code.

An exported model (the artifact later stages read, e.g. ``<run>/reward/``) is a pair
``<name>.safetensors`` + ``<name>.json`` (``{"name", "config", "weights", "sha256", "num_parameters"}``).

All file access goes through the small ``_fs_*`` helpers below so that a switch to fsspec URLs
(``s3://...``) changes one place.

Example:
    .. code-block:: python

        save_checkpoint("runs/x/ckpt", models={"unet": unet}, optimizers={"unet": opt},
                        state={"epoch": 3, "step": 1200}, config={"channels": 64})
        state = load_checkpoint("runs/x/ckpt", models={"unet": unet}, optimizers={"unet": opt})
        export_model("runs/x/reward", "reward", reward_model, config={"channels": 16})
        config = load_model_weights("runs/x/reward", "reward", reward_model)
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

__all__ = [
    "CheckpointError",
    "UnsafeCheckpointError",
    "PICKLE_SUFFIXES",
    "save_checkpoint",
    "load_checkpoint",
    "read_checkpoint_state",
    "read_checkpoint_config",
    "export_model",
    "load_model_weights",
    "read_model_config",
    "file_sha256",
    "unwrap_model",
]

FORMAT = "lgesynth-checkpoint"
VERSION = 1
MANIFEST = "MANIFEST.json"
STATE = "state.json"
CONFIG = "config.json"
PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".pkl", ".pickle", ".ckpt")
_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$")
_TENSOR, _TUPLE, _INT_KEYS = "__tensor__", "__tuple__", "__int_keys__"


class CheckpointError(ValueError):
    """A checkpoint is missing, incomplete, corrupted or does not fit the models given."""


class UnsafeCheckpointError(CheckpointError):
    """A pickle-style file was offered as (or found in) a checkpoint; it is refused, never loaded."""


# ----------------------------------------------------------------------------------------------
# File access: local paths today; the one place to change for fsspec URLs.
# ----------------------------------------------------------------------------------------------


def _fs_exists(path: str) -> bool:
    return os.path.exists(path)


def _fs_isdir(path: str) -> bool:
    return os.path.isdir(path)


def _fs_listdir(path: str) -> list[str]:
    return sorted(os.listdir(path))


def _fs_makedirs(path: str) -> None:
    os.makedirs(path, exist_ok=True)


def _fs_rename(src: str, dst: str) -> None:
    os.replace(src, dst)


def _fs_rmtree(path: str) -> None:
    shutil.rmtree(path, ignore_errors=True)


def _fs_write_text(path: str, text: str) -> None:
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)


def _fs_read_text(path: str) -> str:
    with open(path, encoding="utf-8") as f:
        return f.read()


def _fs_save_tensors(path: str, tensors: dict[str, torch.Tensor]) -> None:
    from safetensors.torch import save_file

    save_file(tensors, path, metadata={"format": "pt"})


def _fs_load_tensors(path: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(path, device="cpu")


def file_sha256(path: str | os.PathLike) -> str:
    """Hex sha256 of a file's bytes, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(os.fspath(path), "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _join(directory: str, name: str) -> str:
    return os.path.join(directory, name)


# ----------------------------------------------------------------------------------------------
# state_dict <-> (json tree, flat tensors)
# ----------------------------------------------------------------------------------------------


def unwrap_model(model: nn.Module) -> nn.Module:
    """The bare module inside DistributedDataParallel/DataParallel and ``torch.compile`` wrappers."""
    while True:
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif hasattr(model, "_orig_mod") and isinstance(model._orig_mod, nn.Module):
            model = model._orig_mod
        else:
            return model


def _cpu_copy(tensor: torch.Tensor) -> torch.Tensor:
    # A private contiguous copy: safetensors refuses shared or strided storage.
    return tensor.detach().to("cpu", copy=True).contiguous()


def _split_tensors(obj: Any, path: str, tensors: dict[str, torch.Tensor]) -> Any:
    """Replace every tensor in ``obj`` with ``{"__tensor__": key}``, collecting it under ``key``.

    Keys are the dotted path in the structure (``state.0.exp_avg``). Tuples and int-keyed dicts are
    tagged so that they come back as they were.
    """
    if isinstance(obj, torch.Tensor):
        tensors[path] = _cpu_copy(obj)
        return {_TENSOR: path}
    if isinstance(obj, Mapping):
        keys = list(obj)
        if all(isinstance(k, str) for k in keys):
            clash = {_TENSOR, _TUPLE, _INT_KEYS} & set(keys)
            if clash:
                raise TypeError(f"{path or '<root>'}: key {sorted(clash)[0]!r} is reserved in checkpoint json")
            return {k: _split_tensors(v, f"{path}.{k}" if path else k, tensors) for k, v in obj.items()}
        if all(isinstance(k, int) and not isinstance(k, bool) for k in keys):
            return {_INT_KEYS: {str(k): _split_tensors(v, f"{path}.{k}" if path else str(k), tensors) for k, v in obj.items()}}
        raise TypeError(f"{path or '<root>'}: dict keys must be all str or all int to be stored, got {keys!r}")
    if isinstance(obj, tuple):
        return {_TUPLE: [_split_tensors(v, f"{path}.{i}", tensors) for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [_split_tensors(v, f"{path}.{i}", tensors) for i, v in enumerate(obj)]
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    if hasattr(obj, "item") and getattr(obj, "shape", None) == ():  # numpy scalar
        return obj.item()
    raise TypeError(
        f"{path or '<root>'}: a {type(obj).__name__} cannot be stored in a checkpoint "
        "(only tensors and json values; pickling is not allowed)"
    )


def _join_tensors(obj: Any, tensors: Mapping[str, torch.Tensor], source: str) -> Any:
    """Inverse of :func:`_split_tensors`."""
    if isinstance(obj, list):
        return [_join_tensors(v, tensors, source) for v in obj]
    if isinstance(obj, dict):
        if set(obj) == {_TENSOR}:
            key = obj[_TENSOR]
            if key not in tensors:
                raise CheckpointError(f"{source}: tensor {key!r} is referenced but missing from the safetensors file")
            return tensors[key]
        if set(obj) == {_TUPLE}:
            return tuple(_join_tensors(v, tensors, source) for v in obj[_TUPLE])
        if set(obj) == {_INT_KEYS}:
            return {int(k): _join_tensors(v, tensors, source) for k, v in obj[_INT_KEYS].items()}
        return {k: _join_tensors(v, tensors, source) for k, v in obj.items()}
    return obj


def _plain_json(obj: Any, what: str) -> str:
    """Json text of a state/config mapping: plain json values only (tuples become lists)."""

    def refuse(value: Any) -> Any:
        if hasattr(value, "item") and getattr(value, "shape", None) == () and not isinstance(value, torch.Tensor):
            return value.item()  # numpy scalar
        kind = "a tensor" if isinstance(value, torch.Tensor) else f"a {type(value).__name__}"
        raise TypeError(f"{what}: {kind} cannot be stored in the checkpoint {what} json; convert it to plain json values (.item(), .tolist())")

    return json.dumps(dict(obj), indent=1, default=refuse)


def _model_tensors(model: nn.Module, name: str) -> dict[str, torch.Tensor]:
    tensors = {}
    for key, value in unwrap_model(model).state_dict().items():
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"model {name!r}: state_dict entry {key!r} is a {type(value).__name__}, not a tensor")
        tensors[key] = _cpu_copy(value)
    return tensors


def _dumps(obj: Any) -> str:
    return json.dumps(obj, indent=1, sort_keys=True, allow_nan=True)


def _check_name(kind: str, name: str) -> None:
    if not isinstance(name, str) or not _NAME.match(name):
        raise ValueError(f"{kind} name must match {_NAME.pattern} (it becomes a file name), got {name!r}")
    if kind == "model" and name.startswith(("optim-", "sched-")):
        raise ValueError(f"model name {name!r} must not start with 'optim-' or 'sched-' (reserved file prefixes)")


# ----------------------------------------------------------------------------------------------
# Training checkpoints
# ----------------------------------------------------------------------------------------------


def save_checkpoint(
    directory: str | os.PathLike,
    *,
    models: Mapping[str, nn.Module],
    optimizers: Mapping[str, torch.optim.Optimizer] | None = None,
    schedulers: Mapping[str, Any] | None = None,
    state: Mapping[str, Any] | None = None,
    config: Mapping[str, Any] | None = None,
) -> Path:
    """Write a checkpoint directory atomically (see the module docstring for the layout).

    Args:
        directory: where the checkpoint goes; replaced if it already holds a checkpoint, refused if
            it is a non-empty directory that is not one.
        models: name -> module (DDP or compiled modules are unwrapped; saved from a CPU copy).
        optimizers: name -> optimizer (tensor state to safetensors, the rest to json).
        schedulers: name -> anything with ``state_dict()``/``load_state_dict()`` (LR schedulers).
        state: json training state (epoch, step, metrics, seeds ...).
        config: json config the weights belong to.

    Returns:
        The checkpoint directory.
    """
    target = os.path.abspath(os.fspath(directory))
    optimizers, schedulers = optimizers or {}, schedulers or {}
    for kind, group in (("model", models), ("optimizer", optimizers), ("scheduler", schedulers)):
        for name in group:
            _check_name(kind, name)
    if _fs_exists(target) and (not _fs_isdir(target) or (_fs_listdir(target) and not _fs_exists(_join(target, MANIFEST)))):
        raise FileExistsError(f"{target} exists and is not a checkpoint directory; refusing to replace it")

    parent, base = os.path.split(target)
    _fs_makedirs(parent)
    tmp = _join(parent, f".{base}.tmp-{uuid.uuid4().hex[:8]}")
    _fs_makedirs(tmp)
    try:
        for name, model in models.items():
            _fs_save_tensors(_join(tmp, f"{name}.safetensors"), _model_tensors(model, name))
        for name, optimizer in optimizers.items():
            tensors: dict[str, torch.Tensor] = {}
            tree = _split_tensors(optimizer.state_dict(), "", tensors)
            _fs_save_tensors(_join(tmp, f"optim-{name}.safetensors"), tensors)
            _fs_write_text(_join(tmp, f"optim-{name}.json"), _dumps(tree))
        for name, scheduler in schedulers.items():
            tensors = {}
            tree = _split_tensors(scheduler.state_dict(), "", tensors)
            if tensors:
                _fs_save_tensors(_join(tmp, f"sched-{name}.safetensors"), tensors)
            _fs_write_text(_join(tmp, f"sched-{name}.json"), _dumps(tree))
        _fs_write_text(_join(tmp, STATE), _plain_json(state or {}, "state"))
        _fs_write_text(_join(tmp, CONFIG), _plain_json(config or {}, "config"))
        files = {
            f: {"sha256": file_sha256(_join(tmp, f)), "bytes": os.path.getsize(_join(tmp, f))} for f in _fs_listdir(tmp)
        }
        _fs_write_text(_join(tmp, MANIFEST), _dumps({"format": FORMAT, "version": VERSION, "files": files}))

        if _fs_exists(target):
            old = _join(parent, f".{base}.old-{uuid.uuid4().hex[:8]}")
            _fs_rename(target, old)
            _fs_rename(tmp, target)
            _fs_rmtree(old)
        else:
            _fs_rename(tmp, target)
    finally:
        if _fs_exists(tmp):
            _fs_rmtree(tmp)
    return Path(target)


def _refuse_pickles(path: str) -> None:
    if path.lower().endswith(PICKLE_SUFFIXES):
        raise UnsafeCheckpointError(
            f"{path}: pickled checkpoints are refused (unpickling runs arbitrary code); "
            "expected a directory of .safetensors + .json files"
        )
    if _fs_isdir(path):
        for name in _fs_listdir(path):
            if name.lower().endswith(PICKLE_SUFFIXES):
                raise UnsafeCheckpointError(
                    f"{_join(path, name)}: pickled checkpoints are refused (unpickling runs arbitrary code); "
                    "remove the file or convert it to safetensors"
                )


def _open_checkpoint(directory: str | os.PathLike) -> tuple[str, dict[str, Any]]:
    """Refuse pickles, read and verify MANIFEST.json; return (directory, manifest files)."""
    path = os.path.abspath(os.fspath(directory))
    _refuse_pickles(path)
    if not _fs_exists(path):
        raise FileNotFoundError(f"{path}: checkpoint directory does not exist")
    if not _fs_isdir(path):
        raise CheckpointError(f"{path}: a checkpoint is a directory of .safetensors + .json files, not a file")
    manifest_path = _join(path, MANIFEST)
    if not _fs_exists(manifest_path):
        raise CheckpointError(f"{manifest_path}: missing; {path} is not a complete checkpoint")
    manifest = json.loads(_fs_read_text(manifest_path))
    if manifest.get("format") != FORMAT:
        raise CheckpointError(f"{manifest_path}: format {manifest.get('format')!r} is not {FORMAT!r}")
    files = manifest["files"]
    for name, entry in files.items():
        file = _join(path, name)
        if not _fs_exists(file):
            raise CheckpointError(f"{file}: listed in {MANIFEST} but missing")
        digest = file_sha256(file)
        if digest != entry["sha256"]:
            raise CheckpointError(f"{file}: sha256 {digest[:12]}... does not match {MANIFEST} ({entry['sha256'][:12]}...); the file is corrupted or was changed")
    return path, files


def _require(path: str, files: Mapping[str, Any], name: str, what: str) -> str:
    if name not in files:
        present = sorted(f for f in files if f.endswith(".safetensors") and not f.startswith(("optim-", "sched-")))
        raise CheckpointError(f"{_join(path, name)}: missing, so the checkpoint holds no {what} (models present: {present})")
    return _join(path, name)


def load_checkpoint(
    directory: str | os.PathLike,
    *,
    models: Mapping[str, nn.Module],
    optimizers: Mapping[str, torch.optim.Optimizer] | None = None,
    schedulers: Mapping[str, Any] | None = None,
    strict: bool = True,
) -> dict[str, Any]:
    """Load a checkpoint written by :func:`save_checkpoint` into the given objects, in place.

    Every file is checked against MANIFEST.json before anything is loaded.

    Args:
        directory: the checkpoint directory.
        models: name -> module to load into (wrappers are unwrapped); each must be in the checkpoint.
        optimizers: name -> optimizer to load into (tensors move to their parameters' device).
        schedulers: name -> LR scheduler to load into.
        strict: passed to ``load_state_dict`` for the models; when False, optimizers or schedulers
            missing from the checkpoint are skipped instead of raising.

    Returns:
        The training state (``state.json``).

    Raises:
        UnsafeCheckpointError: ``directory`` is, or contains, a pickle-style file.
        CheckpointError: a file is missing or its sha256 does not match the manifest.
    """
    path, files = _open_checkpoint(directory)
    for name, model in models.items():
        file = _require(path, files, f"{name}.safetensors", f"model {name!r}")
        unwrap_model(model).load_state_dict(_fs_load_tensors(file), strict=strict)
    for kind, prefix, group in (("optimizer", "optim", optimizers or {}), ("scheduler", "sched", schedulers or {})):
        for name, obj in group.items():
            json_name = f"{prefix}-{name}.json"
            if json_name not in files:
                if strict:
                    _require(path, files, json_name, f"{kind} {name!r}")
                continue
            tensor_name = f"{prefix}-{name}.safetensors"
            tensors = _fs_load_tensors(_join(path, tensor_name)) if tensor_name in files else {}
            tree = json.loads(_fs_read_text(_join(path, json_name)))
            state_dict = _join_tensors(tree, tensors, _join(path, json_name))
            obj.load_state_dict(state_dict)
    return read_checkpoint_state(path, verified=True)


def read_checkpoint_state(directory: str | os.PathLike, *, verified: bool = False) -> dict[str, Any]:
    """The training state (``state.json``) of a checkpoint, after verifying the manifest."""
    path = os.path.abspath(os.fspath(directory))
    if not verified:
        _open_checkpoint(path)
    return json.loads(_fs_read_text(_join(path, STATE)))


def read_checkpoint_config(directory: str | os.PathLike) -> dict[str, Any]:
    """The config (``config.json``) a checkpoint was written with, after verifying the manifest."""
    path, _ = _open_checkpoint(directory)
    return json.loads(_fs_read_text(_join(path, CONFIG)))


# ----------------------------------------------------------------------------------------------
# Exported models: the artifacts later stages read
# ----------------------------------------------------------------------------------------------


def export_model(directory: str | os.PathLike, name: str, model: nn.Module, config: Mapping[str, Any]) -> dict[str, Any]:
    """Write ``<directory>/<name>.safetensors`` and ``<directory>/<name>.json``.

    The json is written last (each file via a temporary name and an atomic rename), so a reader that
    finds it finds complete weights whose sha256 it records.

    Returns:
        The json record: ``{"name", "config", "weights", "sha256", "num_parameters"}``.
    """
    _check_name("model", name)
    path = os.path.abspath(os.fspath(directory))
    _fs_makedirs(path)
    weights = f"{name}.safetensors"
    tmp = _join(path, f".{weights}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        _fs_save_tensors(tmp, _model_tensors(model, name))
        digest = file_sha256(tmp)
        _fs_rename(tmp, _join(path, weights))
    finally:
        if _fs_exists(tmp):
            os.remove(tmp)
    record = {
        "name": name,
        "config": json.loads(_plain_json(config, "config")),
        "weights": weights,
        "sha256": digest,
        "num_parameters": sum(p.numel() for p in unwrap_model(model).parameters()),
    }
    tmp_json = _join(path, f".{name}.json.tmp-{uuid.uuid4().hex[:8]}")
    _fs_write_text(tmp_json, _dumps(record))
    _fs_rename(tmp_json, _join(path, f"{name}.json"))
    return record


def _read_model_record(directory: str | os.PathLike, name: str) -> tuple[str, dict[str, Any]]:
    path = os.path.abspath(os.fspath(directory))
    _refuse_pickles(path)
    record_path = _join(path, f"{name}.json")
    if not _fs_exists(record_path):
        raise CheckpointError(f"{record_path}: missing; no exported model {name!r} in {path}")
    return path, json.loads(_fs_read_text(record_path))


def read_model_config(directory: str | os.PathLike, name: str) -> dict[str, Any]:
    """The config an exported model was saved with (to build the module before loading weights)."""
    return _read_model_record(directory, name)[1]["config"]


def load_model_weights(directory: str | os.PathLike, name: str, model: nn.Module, *, strict: bool = True) -> dict[str, Any]:
    """Load weights written by :func:`export_model` into ``model`` after checking their sha256.

    Returns:
        The model's config (from ``<name>.json``).
    """
    path, record = _read_model_record(directory, name)
    weights = _join(path, record["weights"])
    if not _fs_exists(weights):
        raise CheckpointError(f"{weights}: missing, though {name}.json refers to it")
    digest = file_sha256(weights)
    if digest != record["sha256"]:
        raise CheckpointError(f"{weights}: sha256 {digest[:12]}... does not match {name}.json ({record['sha256'][:12]}...)")
    unwrap_model(model).load_state_dict(_fs_load_tensors(weights), strict=strict)
    return record["config"]
