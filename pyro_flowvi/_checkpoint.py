"""Checkpoints of :func:`pyro_flowvi.fit`, in a format that loads without running code.

A checkpoint is a dictionary of tensors and plain data (``str``, ``int``, ``float``,
``bool``, ``None``, lists, tuples and dictionaries), written with :func:`torch.save` through a
temporary file and :func:`os.replace` (a crash mid-write leaves the previous checkpoint whole),
and read with ``torch.load(weights_only=True)``, whose unpickler rebuilds tensors and plain
containers only and refuses every other global: a file crafted to run code on loading is
refused before any of it runs. Whatever is not plain data is converted on writing: parameter
constraints to a description (class name, event dimension, bounds), the Python and NumPy
random-number states to tensors and numbers, optimizer hyper-parameters to plain values.

Version 2 is this format; version 1 (pyro-flowvi 0.1) pickled arbitrary objects and is
refused with a message that says so.
"""

from __future__ import annotations

__all__ = [
    "FORMAT",
    "VERSION",
    "CheckpointError",
    "check_plain",
    "describe_constraint",
    "load_optimizer_states",
    "optimizer_description",
    "optimizer_states",
    "own_state",
    "process_state",
    "read_checkpoint",
    "restore_optimizer",
    "restore_params_and_buffers",
    "rng_from_plain",
    "rng_to_plain",
    "write_checkpoint",
]

import math
import numbers
import os
import pickle
import re
import warnings
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pyro
import torch
from pyro.util import get_rng_state

FORMAT = "pyro-flowvi fit checkpoint"
VERSION = 2

# what a version-1 checkpoint (a plain pickle of the parameter store, numpy RNG state and
# constraint objects) names; anything else in a refused file is foreign
_VERSION_1_MODULES = ("numpy.", "torch.distributions.constraints.", "pyro.distributions.")

_REQUIRED: dict[str, type | tuple[type, ...]] = {
    "step": int,
    "elbo_trace": torch.Tensor,
    "wall_time": float,
    "params": dict,
    "constraints": dict,
    "optim": (dict, type(None)),
    "rng": dict,
    "cuda_rng": (list, type(None)),
    "model_buffers": dict,
    "guide_buffers": dict,
    "divergence": dict,
}


# nested entries, as dotted paths; the optimizer entry is checked when there is one
_REQUIRED_NESTED: dict[str, type | tuple[type, ...]] = {
    "rng.torch": torch.Tensor,
    "rng.random.version": int,
    "rng.random.keys": torch.Tensor,
    "rng.random.gauss": (float, type(None)),
    "rng.numpy.kind": str,
    "rng.numpy.keys": torch.Tensor,
    "rng.numpy.pos": int,
    "rng.numpy.has_gauss": int,
    "rng.numpy.gauss": float,
    "optim.description.class": str,
    "optim.description.args": dict,
    "optim.states": dict,
    "divergence.window_start": int,
    "divergence.stopped": bool,
}


class CheckpointError(ValueError):
    """A checkpoint file that :func:`~pyro_flowvi.fit` cannot resume from.

    Raised for a file that is empty, truncated, not a pyro-flowvi checkpoint, of another
    format version, holds objects other than tensors and plain data (it is not unpickled), or
    was written for another model, guide or optimizer.

    Attributes:
        path: the checkpoint's path.
        problem: what is wrong with it (the message without the path).
    """

    def __init__(self, path: str | os.PathLike, problem: str) -> None:
        self.path = str(path)
        self.problem = problem
        super().__init__(f"fit: checkpoint {self.path!r} {problem}")


def _qualname(obj: Any) -> str:
    return f"{getattr(obj, '__module__', '?')}.{getattr(obj, '__qualname__', repr(obj))}"


def check_plain(obj: Any, where: str) -> None:
    """Raise ``TypeError`` naming the place of the first value ``torch.load`` would refuse."""
    if obj is None or isinstance(obj, (bool, int, float, str, torch.Tensor)):
        return
    if isinstance(obj, (list, tuple)):
        for i, item in enumerate(obj):
            check_plain(item, f"{where}[{i}]")
        return
    if isinstance(obj, dict):
        for key, value in obj.items():
            if not isinstance(key, (str, int)):
                raise TypeError(
                    f"fit: checkpoint entry {where} has a key {key!r} of type {type(key)}"
                )
            check_plain(value, f"{where}[{key!r}]")
        return
    raise TypeError(
        f"fit: checkpoint entry {where} is a {_qualname(type(obj))}; checkpoints hold tensors "
        "and plain data only"
    )


def _plain(value: Any) -> Any:
    """A plain-data version of an optimizer argument, for storing and comparing."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, numbers.Real):
        return float(value)
    if torch.is_tensor(value):
        return value.detach().cpu().clone()
    if isinstance(value, (list, tuple)):
        return type(value)(_plain(v) for v in value)
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if callable(value):
        return f"<{_qualname(value)}>"
    return repr(value)


def _same(a: Any, b: Any) -> bool:
    if torch.is_tensor(a) or torch.is_tensor(b):
        return (
            torch.is_tensor(a)
            and torch.is_tensor(b)
            and a.shape == b.shape
            and torch.equal(a.cpu(), b.cpu())
        )
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    return type(a) is type(b) and a == b


def describe_constraint(constraint: Any) -> dict[str, Any]:
    """A plain description of a parameter constraint: its class, event dimension, bounds."""
    description: dict[str, Any] = {"class": _qualname(type(constraint))}
    event_dim = getattr(constraint, "event_dim", None)
    if isinstance(event_dim, int):
        description["event_dim"] = event_dim
    for attr in ("lower_bound", "upper_bound", "reinterpreted_batch_ndims"):
        if hasattr(constraint, attr):
            description[attr] = _plain(getattr(constraint, attr))
    base = getattr(constraint, "base_constraint", None)
    if base is not None:
        description["base_constraint"] = describe_constraint(base)
    return description


# random-number states -------------------------------------------------------------------


def rng_to_plain(state: Mapping[str, Any]) -> dict[str, Any]:
    """Convert :func:`pyro.util.get_rng_state` output to tensors and numbers."""
    py_version, py_keys, py_gauss = state["random"]
    np_kind, np_keys, np_pos, np_has_gauss, np_gauss = state["numpy"]
    return {
        "torch": state["torch"].clone(),
        "random": {
            "version": int(py_version),
            "keys": torch.tensor(py_keys, dtype=torch.int64),
            "gauss": None if py_gauss is None else float(py_gauss),
        },
        "numpy": {
            "kind": str(np_kind),
            "keys": torch.from_numpy(np.asarray(np_keys, dtype=np.int64).copy()),
            "pos": int(np_pos),
            "has_gauss": int(np_has_gauss),
            "gauss": float(np_gauss),
        },
    }


def rng_from_plain(plain: Mapping[str, Any]) -> dict[str, Any]:
    """The inverse of :func:`rng_to_plain`, for :func:`pyro.util.set_rng_state`."""
    py, npy = plain["random"], plain["numpy"]
    return {
        "torch": plain["torch"],
        "random": (py["version"], tuple(int(k) for k in py["keys"].tolist()), py["gauss"]),
        "numpy": (
            npy["kind"],
            npy["keys"].numpy().astype(np.uint32),
            npy["pos"],
            npy["has_gauss"],
            npy["gauss"],
        ),
    }


def process_state(position: tuple[int, int, Mapping[str, Any] | None] | None) -> dict[str, Any]:
    """This process's random-number state and position in the mini-batches, as plain data.

    Arguments:
        position: ``(epoch, batches taken in it, random-number state at its start)``, or
            ``None`` for a fit without mini-batches.
    """
    batches = None
    if position is not None:
        epoch, index, rng = position
        batches = {
            "epoch": epoch,
            "index": index,
            "epoch_rng": None if rng is None else rng_to_plain(rng),
        }
    return {
        "rng": rng_to_plain(get_rng_state()),
        "cuda_rng": list(torch.cuda.get_rng_state_all()) if torch.cuda.is_initialized() else None,
        "batches": batches,
    }


def own_state(state: Mapping[str, Any], rank: int) -> dict[str, Any] | None:
    """The :func:`process_state` a checkpoint saved for process ``rank``, if any: from the
    per-process entry of a data-parallel fit, else (rank 0) from the top level."""
    ranks = state.get("ranks")
    if ranks is not None:
        return ranks[rank] if rank < len(ranks) else None
    if rank != 0:
        return None
    return {"rng": state["rng"], "cuda_rng": state["cuda_rng"], "batches": state.get("batches")}


# optimizer state ------------------------------------------------------------------------


def _is_pyro_optim(optim: Any) -> bool:
    return isinstance(optim, pyro.optim.PyroOptim)


def _is_scheduler(optim: Any) -> bool:
    return isinstance(optim, pyro.optim.PyroLRScheduler)


_ATOMIC = (bool, int, float, str, type(None))


def _clone_tree(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.detach().clone()
    if isinstance(obj, dict):
        return {k: v if isinstance(v, _ATOMIC) else _clone_tree(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(v if isinstance(v, _ATOMIC) else _clone_tree(v) for v in obj)
    return obj


def _optim_args(optim: Any, param: torch.Tensor) -> dict[str, Any]:
    # PyroOptim's own rule for per-parameter arguments (a dict, or a callable of the name)
    return dict(optim._get_optim_args(param))


def optimizer_description(optim: Any, params: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    """What the optimizer is: its class and, per parameter name, its constructor arguments."""
    if not _is_pyro_optim(optim):
        return {"class": _qualname(type(optim)), "args": {}}
    description: dict[str, Any] = {
        "class": _qualname(optim.pt_optim_constructor),
        "args": {name: _plain(_optim_args(optim, p)) for name, p in params.items()},
    }
    if _is_scheduler(optim):
        description["scheduler"] = _qualname(optim.pt_scheduler_constructor)
        description["scheduler_args"] = _plain(optim.kwargs)
    return description


def optimizer_states(optim: Any, names: Iterable[str], *, clone: bool) -> dict[str, Any]:
    """The optimizer's per-parameter states for ``names`` (PyroOptim's ``get_state`` format)."""
    names = set(names)
    if _is_pyro_optim(optim):
        # states a resume handed over that no step has consumed yet are still this fit's state
        states = {k: v for k, v in optim._state_waiting_to_be_consumed.items() if k in names}
        states.update({k: v for k, v in optim.get_state().items() if k in names})
    else:
        states = dict(optim.get_state())
    return _clone_tree(states) if clone else states


def _load_into(obj: Any, state: Mapping[str, Any]) -> None:
    if hasattr(obj, "optimizer"):  # a learning-rate scheduler around a torch optimizer
        obj.load_state_dict(state["scheduler"])
        obj.optimizer.load_state_dict(state["optimizer"])
    else:
        obj.load_state_dict(state)


def load_optimizer_states(optim: Any, states: Mapping[str, Any]) -> None:
    """Give ``optim`` these per-parameter states, also for parameters it already steps."""
    states = _clone_tree(dict(states))  # torch optimizers may keep the tensors they load
    if not _is_pyro_optim(optim):
        optim.set_state(states)
        return
    current = dict(pyro.get_param_store().named_parameters())
    waiting = {}
    for name, state in states.items():
        obj = optim.optim_objs.get(current.get(name))
        if obj is None:
            waiting[name] = state
        else:
            _load_into(obj, state)
    optim.set_state(waiting)


def restore_optimizer(
    path: Path,
    optim: Any,
    saved: Mapping[str, Any],
    params: Mapping[str, torch.Tensor],
    *,
    adjust: Callable[[dict], None] | None = None,
) -> None:
    """Resume ``optim`` from the checkpoint's optimizer entry.

    The optimizer's state (Adam's moments and step counts, a scheduler's position) comes from
    the checkpoint. Its hyper-parameters come from the optimizer passed to this fit: when its
    constructor arguments equal the checkpoint's, the checkpoint's values are kept as they are
    (``ClippedAdam``'s decayed learning rate included), so the resumed fit is exactly the
    uninterrupted one; when they differ, every hyper-parameter is set to what ``optim`` would
    start with. ``adjust``, when given, then edits every parameter group in place (``fit``
    puts its default optimizer on the current call's learning-rate schedule). Another
    optimizer class, or a learning-rate scheduler with other settings, is refused: its state
    does not carry over.
    """
    description, states = saved["description"], dict(saved["states"])
    now = optimizer_description(optim, params)
    if description["class"] != now["class"]:
        raise CheckpointError(
            path,
            f"was written with optimizer {description['class']}, this fit uses {now['class']}; "
            "its state does not carry over (pass the same optimizer class to resume, or delete "
            "the checkpoint to start again)",
        )
    if description.get("scheduler") != now.get("scheduler") or not _same(
        description.get("scheduler_args"), now.get("scheduler_args")
    ):
        raise CheckpointError(
            path,
            f"was written with learning-rate scheduler {description.get('scheduler')} "
            f"{description.get('scheduler_args')}, this fit uses {now.get('scheduler')} "
            f"{now.get('scheduler_args')}; a scheduler's state does not carry over to other "
            "settings",
        )
    if _is_pyro_optim(optim) and not _is_scheduler(optim):
        for name, state in states.items():
            if name in params and not _same(description["args"].get(name), now["args"][name]):
                fresh = optim.pt_optim_constructor(
                    [params[name]], **_optim_args(optim, params[name])
                )
                hyper = {k: v for k, v in fresh.param_groups[0].items() if k != "params"}
                groups = [{**group, **hyper} for group in state["param_groups"]]
                states[name] = {**state, "param_groups": groups}
    if adjust is not None:
        states = {
            name: {**state, "param_groups": [dict(group) for group in state["param_groups"]]}
            for name, state in states.items()
        }
        for state in states.values():
            for group in state["param_groups"]:
                adjust(group)
    load_optimizer_states(optim, states)


# parameters and buffers -----------------------------------------------------------------


def _mismatch(kind: str, saved: Iterable[str], current: Iterable[str]) -> str | None:
    extra, missing = sorted(set(saved) - set(current)), sorted(set(current) - set(saved))
    if not (extra or missing):
        return None
    parts = []
    if extra:
        parts.append(f"{kind} in the checkpoint that this model and guide do not have: {extra}")
    if missing:
        parts.append(f"{kind} of this model and guide that the checkpoint lacks: {missing}")
    return "; ".join(parts)


def _check_tensor(path: Path, kind: str, name: str, saved: Any, current: torch.Tensor) -> None:
    if not torch.is_tensor(saved):
        raise CheckpointError(path, f"holds {kind} {name!r} as a {type(saved).__name__}")
    if saved.shape != current.shape or saved.dtype != current.dtype:
        raise CheckpointError(
            path,
            f"holds {kind} {name!r} with shape {tuple(saved.shape)} and dtype {saved.dtype}; "
            f"this model and guide have shape {tuple(current.shape)} and dtype "
            f"{current.dtype}",
        )


def restore_params_and_buffers(
    path: Path,
    state: Mapping[str, Any],
    params: Mapping[str, torch.Tensor],
    constraints: Mapping[str, Any],
    buffers: Mapping[str, Mapping[str, torch.Tensor]],
) -> None:
    """Check that the checkpoint is this model and guide's, then copy its values in place.

    Arguments:
        path: the checkpoint (for messages).
        state: the checkpoint, as read by :func:`read_checkpoint`.
        params: this model and guide's parameters, name -> unconstrained tensor.
        constraints: their constraints, name -> constraint.
        buffers: ``{"model_buffers": {...}, "guide_buffers": {...}}`` of the rebuilt modules.

    Raises:
        CheckpointError: if the parameter names, shapes, dtypes or constraints, or the buffer
            names, shapes or dtypes differ; nothing is copied then.
    """
    problems = [_mismatch("parameters", state["params"], params)]
    for key, own in buffers.items():
        problems.append(_mismatch(f"{key.split('_')[0]} buffers", state[key], own))
    found = [p for p in problems if p]
    if found:
        raise CheckpointError(path, "does not match this model and guide: " + "; ".join(found))
    for name, current in params.items():
        _check_tensor(path, "parameter", name, state["params"][name], current)
        saved_constraint = state["constraints"].get(name)
        own_constraint = describe_constraint(constraints[name])
        if not _same(saved_constraint, own_constraint):
            raise CheckpointError(
                path,
                f"holds parameter {name!r} with constraint {saved_constraint}; this model and "
                f"guide declare {own_constraint}",
            )
    for key, own in buffers.items():
        for name, current in own.items():
            _check_tensor(path, f"{key.split('_')[0]} buffer", name, state[key][name], current)
    with torch.no_grad():
        # in place, so modules that own these tensors and the optimizer keep pointing at them
        for name, current in params.items():
            current.copy_(state["params"][name])
        for key, own in buffers.items():
            for name, current in own.items():
                current.copy_(state[key][name])


# reading and writing --------------------------------------------------------------------


def write_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """Write ``state`` atomically: to ``<path>.tmp``, flushed to disk, then renamed."""
    check_plain(state, "checkpoint")
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as handle:
            torch.save({"format": FORMAT, "version": VERSION, **state}, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def _refused_globals(path: Path, error: Exception) -> list[str]:
    try:
        return list(torch.serialization.get_unsafe_globals_in_checkpoint(path))
    except Exception:  # not a zip checkpoint, or an older torch: read the unpickler's message
        return re.findall(r"GLOBAL ([\w.]+)", str(error))


def _require(path: Path, state: dict[str, Any], dotted: str, kind: type | tuple) -> None:
    value: Any = state
    for part in dotted.split("."):
        if value is None and dotted.startswith("optim."):
            return  # an optimizer without state
        if not isinstance(value, dict) or part not in value:
            raise CheckpointError(path, f"is damaged: entry {dotted!r} is missing")
        value = value[part]
    if not isinstance(value, kind):
        raise CheckpointError(
            path, f"is damaged: entry {dotted!r} is a {type(value).__name__}, not {kind}"
        )


# a random-number state inside an entry, as dotted paths below it
_RNG_NESTED = {k[len("rng.") :]: v for k, v in _REQUIRED_NESTED.items() if k.startswith("rng.")}


def _require_below(path: Path, root: Any, where: str, dotted: str, kind: type | tuple) -> None:
    value = root
    for part in dotted.split("."):
        if not isinstance(value, dict) or part not in value:
            raise CheckpointError(path, f"is damaged: entry '{where}.{dotted}' is missing")
        value = value[part]
    if not isinstance(value, kind):
        raise CheckpointError(
            path, f"is damaged: entry '{where}.{dotted}' is a {type(value).__name__}, not {kind}"
        )


def _check_position(path: Path, position: Any, where: str) -> None:
    if position is None:
        return
    for key, kind in (("epoch", int), ("index", int), ("epoch_rng", (dict, type(None)))):
        _require_below(path, position, where, key, kind)
    if position["epoch_rng"] is not None:
        for key, kind in _RNG_NESTED.items():
            _require_below(path, position, where, f"epoch_rng.{key}", kind)


def _check_processes(path: Path, state: dict[str, Any]) -> None:
    """The entries of mini-batch and data-parallel fits (absent from older checkpoints)."""
    for key, kind in (
        ("batches", (dict, type(None))),
        ("ranks", (list, type(None))),
        ("world_size", int),
    ):
        if key in state and not isinstance(state[key], kind):
            raise CheckpointError(
                path, f"is damaged: entry {key!r} is a {type(state[key]).__name__}, not {kind}"
            )
    _check_position(path, state.get("batches"), "batches")
    for rank, process in enumerate(state.get("ranks") or []):
        where = f"ranks[{rank}]"
        _require_below(path, process, where, "cuda_rng", (list, type(None)))
        _require_below(path, process, where, "batches", (dict, type(None)))
        for key, kind in _RNG_NESTED.items():
            _require_below(path, process, where, f"rng.{key}", kind)
        _check_position(path, process["batches"], f"{where}.batches")


def read_checkpoint(path: Path) -> dict[str, Any]:
    """Load and validate a checkpoint without running code from it.

    Raises:
        CheckpointError: for an empty, truncated, foreign or unsafe file, a file of another
            format version, or one that lacks an entry of this format.
    """
    if path.stat().st_size == 0:
        raise CheckpointError(path, "is empty (delete it to start a new fit)")
    try:
        with warnings.catch_warnings():
            # the weights-only unpickler warns about pickle protocols before refusing a file
            warnings.simplefilter("ignore")
            state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        names = _refused_globals(path, error)
        if names and all(n.startswith(_VERSION_1_MODULES) for n in names):
            raise CheckpointError(
                path,
                "is a version-1 checkpoint (pyro-flowvi 0.1 pickled Python objects, which can "
                f"run code when loaded); this version reads only version-{VERSION} "
                "checkpoints, which hold tensors and plain data: delete or move the file to "
                "start the fit again",
            ) from None
        if names:
            raise CheckpointError(
                path,
                f"holds objects other than tensors and plain data ({', '.join(names)}); it was "
                "refused without being unpickled, since unpickling could run code",
            ) from None
        reason = str(error).split("WeightsUnpickler error:")[-1].strip().split("\n")[0]
        raise CheckpointError(
            path,
            f"is not a pyro-flowvi checkpoint or is damaged ({reason}); it was refused without "
            "being unpickled, since unpickling could run code",
        ) from None
    except Exception as error:
        raise CheckpointError(
            path,
            "cannot be read: it is truncated or not a file written by torch.save "
            f"({type(error).__name__}: {error})",
        ) from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        if isinstance(state, dict) and state.get("version") == 1:
            raise CheckpointError(path, "is a version-1 checkpoint; delete or move it")
        raise CheckpointError(path, "is not a pyro-flowvi fit checkpoint")
    if state.get("version") != VERSION:
        raise CheckpointError(
            path,
            f"has format version {state.get('version')!r}; this version of pyro-flowvi reads "
            f"version {VERSION}",
        )
    for key, kind in _REQUIRED.items():
        _require(path, state, key, kind)
    for key, kind in _REQUIRED_NESTED.items():
        _require(path, state, key, kind)
    for key in ("params", "model_buffers", "guide_buffers"):
        for name, value in state[key].items():
            if not torch.is_tensor(value):
                raise CheckpointError(path, f"is damaged: {key} entry {name!r} is no tensor")
    _check_processes(path, state)
    if state["elbo_trace"].shape != (state["step"],):
        raise CheckpointError(path, "is damaged: its ELBO trace does not match its step count")
    return state
