"""Checkpoints of a whole `Program`: everything needed for a resumed run to continue exactly.

A sharded level (`shard=True`) is saved as this rank's shards (`mlo.sharding.saved`) and
resumes on as many ranks.

Files are written atomically (a temporary file in the same folder, flushed and fsynced, then
`os.replace`d onto the target and the folder fsynced): a crash or a kill at any moment leaves
either the old checkpoint or the new one, never a partial file.
"""

from __future__ import annotations

import os
import pickle
import random
import tempfile
import zipfile
from pathlib import Path

import torch

from . import distributed, sharding
from .errors import CheckpointError, quoted
from .history import History
from .optim import FunctionalOptimizer
from .unroll import Window

FORMAT = 2


def program_state(program) -> dict:
    """Return the program's state as plain containers of tensors and numbers (safe to load)."""
    levels = {}
    for name, level in program.levels.items():
        scheduler = level.options.scheduler
        levels[name] = {
            "module": level.module.detach().clone() if isinstance(level.module, torch.Tensor)
            else level.module.state_dict(),
            "optimizer": level.optimizer.state_dict(),
            "scheduler": scheduler.state_dict() if scheduler is not None else None,
            "precision": program._precision[name].state_dict(),
            "data": program._streams[name].state_dict() if name in program._streams else None,
            "last_batch": program._last_batch.get(name),
        }
        if name in program._sharded:  # each rank its own shards
            levels[name] = sharding.saved(levels[name])
    return {
        "format": FORMAT, "world_size": distributed.world_size(),
        "global_step": program.global_step, "steps": dict(program.steps),
        "skipped": dict(program.skipped), "seen": program._seen, "levels": levels,
        "history": program.history.state_dict(),
        "windows": {f"{u}/{low}": sharding.saved(_window_state(w)) if low in program._sharded
                    else _window_state(w) for (u, low), w in program._windows.items()},
        "rng": _rng_state(),
    }


def load_program_state(program, state: dict) -> None:
    """Restore `program_state` output into `program`, which must have the same levels."""
    if not isinstance(state, dict) or "format" not in state:
        raise CheckpointError("Program.load_state_dict: not an mlo checkpoint (no 'format' "
                              "key); save it with program.save(path) or state_dict().")
    if state["format"] != FORMAT:
        raise CheckpointError(f"Program.load_state_dict: the checkpoint has format "
                              f"{state['format']!r}, this version of mlo reads format {FORMAT}; "
                              f"load it with the mlo version that wrote it.")
    if state["world_size"] != distributed.world_size():
        raise CheckpointError(
            f"Program.load_state_dict: the checkpoint was saved by {state['world_size']} rank(s), "
            f"this run has {distributed.world_size()}; each rank's data position, RNG state and "
            f"recorded batches are its own, so resume with the same number of ranks.")
    saved, ours = set(state["levels"]), set(program.levels)
    if saved != ours:
        raise CheckpointError(f"Program.load_state_dict: the checkpoint has levels {quoted(saved)}, "
                              f"this program has {quoted(ours)} (missing here: "
                              f"{quoted(saved - ours)}; not in the checkpoint: "
                              f"{quoted(ours - saved)}); build the program from the same levels "
                              f"it was saved from.")
    entries = {name: sharding.loaded(entry, program.levels[name])
               for name, entry in state["levels"].items()}
    for name, entry in entries.items():
        _check_level(program.levels[name], entry)
    for name, entry in entries.items():
        _load_level(program, name, entry)
    program.global_step, program.steps = state["global_step"], dict(state["steps"])
    program.skipped, program._seen = dict(state["skipped"]), state["seen"]
    program.history = History.from_state(state["history"])
    program._windows = {tuple(key.split("/")): _window_from(sharding.loaded(
        w, program.levels[key.split("/")[1]])) for key, w in state["windows"].items()}
    _set_rng_state(state["rng"])


def _check_level(level, entry: dict) -> None:
    """Refuse a level's saved state that does not fit it, before anything is overwritten."""
    prefix = f"Program.load_state_dict: level '{level.name}':"
    ours = {"param": level.module} if isinstance(level.module, torch.Tensor) \
        else level.module.state_dict()
    saved = {"param": entry["module"]} if isinstance(entry["module"], torch.Tensor) \
        else entry["module"]
    if set(saved) != set(ours):
        raise CheckpointError(f"{prefix} the checkpoint's module has entries "
                              f"{quoted(set(saved) - set(ours))} that this one lacks, and lacks "
                              f"{quoted(set(ours) - set(saved))}; "
                              f"build the module with the architecture it was saved with.")
    for key, tensor in ours.items():
        if tuple(saved[key].shape) != tuple(tensor.shape):
            raise CheckpointError(f"{prefix} '{key}' has shape {tuple(saved[key].shape)} in the "
                                  f"checkpoint and {tuple(tensor.shape)} here; build the module "
                                  f"with the sizes it was saved with.")
    groups = level.optimizer.state_dict()["param_groups"]
    saved_groups = entry["optimizer"]["param_groups"]
    if [len(g["params"]) for g in saved_groups] != [len(g["params"]) for g in groups] or \
            any(set(a) - set(b) for a, b in zip(saved_groups, groups)):
        raise CheckpointError(f"{prefix} the checkpoint's optimizer has other parameter groups "
                              f"or hyperparameters ({sorted(set(saved_groups[0]) - {'params'})}) "
                              f"than this level's; build the optimizer it was saved with.")


def _load_level(program, name: str, entry: dict) -> None:
    level = program.levels[name]
    with torch.no_grad():
        if isinstance(level.module, torch.Tensor):
            level.module.copy_(entry["module"])
        else:
            level.module.load_state_dict(entry["module"])
    level.optimizer.load_state_dict(entry["optimizer"])
    if entry["scheduler"] is not None:
        level.options.scheduler.load_state_dict(entry["scheduler"])
    program._precision[name].load_state_dict(entry["precision"])
    if entry["data"] is not None and name in program._streams:
        program._streams[name].load_state_dict(entry["data"])
    if entry["last_batch"] is not None:
        program._last_batch[name] = entry["last_batch"]


def save(state: dict, path) -> None:
    """Write `state` to `path` atomically: the file at `path` is always a complete checkpoint.

    Cost: one serialization, one fsync of the file and one of its folder.
    """
    path = Path(path)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(handle, "wb") as file:
            torch.save(state, file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    _fsync_folder(path.parent)


def _fsync_folder(folder: Path) -> None:
    """Make the rename durable: without it, a power loss can undo `os.replace`."""
    try:
        descriptor = os.open(folder, os.O_RDONLY)
    except OSError:
        return  # platforms without directory descriptors (Windows) order renames themselves
    try:
        os.fsync(descriptor)
    except OSError:
        pass
    finally:
        os.close(descriptor)


def load(path) -> dict:
    """Read a checkpoint with `torch.load(weights_only=True)`: no arbitrary object is unpickled.

    The file's checksums are verified first (torch does not), so a truncated or corrupted file
    is reported as such rather than loaded with wrong values. Cost: two reads of the file.
    A folder written by `run(checkpoint=...)` stands for its newest checkpoint.
    """
    if Path(path).is_dir():
        from .folder import latest_file  # the folder logic builds on this module
        path = latest_file(path)
    _check_file(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, AttributeError, TypeError) as error:
        raise CheckpointError(
            f"Program.load: refused to load {path}: it holds objects other than tensors and plain "
            f"containers, so it is not an mlo checkpoint (or it was tampered with). "
            f"Details: {str(error).splitlines()[0]}") from None


def _check_file(path) -> None:
    try:
        with open(path, "rb") as file:
            magic = file.read(4)
    except FileNotFoundError:
        raise CheckpointError(f"Program.load: no checkpoint at {path}; check the path.") from None
    if magic != b"PK\x03\x04":
        raise CheckpointError(f"Program.load: {path} is not an mlo checkpoint (not a torch "
                              f"zip file); write checkpoints with program.save(path).")
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
    except (zipfile.BadZipFile, OSError, EOFError) as error:
        raise CheckpointError(f"Program.load: {path} is truncated or corrupted ({error}); it was "
                              f"not written completely. Load an earlier checkpoint.") from None
    if bad is not None:
        raise CheckpointError(f"Program.load: {path} is corrupted: record '{bad}' fails its "
                              f"checksum. Load an earlier checkpoint.")


def _window_state(window: Window) -> dict:
    return {"params": window.params, "state": window.state, "batches": window.batches,
            "optimizers": [{"kind": o.kind, "hyper": o.hyper, "clip_grad": o.clip_grad}
                           for o in window.optimizers], "rng": window.rng,
            "values": window.values, "points": window.points, "reads": window.reads}


def _window_from(state: dict) -> Window:
    batches = list(state["batches"])
    return Window(state["params"], state["state"], batches,
                  [FunctionalOptimizer(**o) for o in state["optimizers"]],
                  list(state.get("rng", [None] * len(batches))), list(state.get("values", [])),
                  list(state.get("points", [])), list(state.get("reads", [{}] * len(batches))))


def _rng_state() -> dict:
    version, internal, gauss = random.getstate()
    state = {"torch": torch.get_rng_state(), "python": [version, list(internal), gauss]}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    try:
        import numpy
        kind, keys, pos, has_gauss, cached = numpy.random.get_state()
        state["numpy"] = [kind, torch.from_numpy(keys.astype("int64")), pos, has_gauss, cached]
    except ImportError:
        pass
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if "numpy" in state:
        import numpy
        kind, keys, pos, has_gauss, cached = state["numpy"]
        numpy.random.set_state((kind, keys.numpy().astype("uint32"), pos, has_gauss, cached))
