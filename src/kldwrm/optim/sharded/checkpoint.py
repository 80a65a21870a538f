"""Optimizer state for ``torch.distributed.checkpoint`` (DCP): saved by every rank, each
its own blocks, and loaded at any number of ranks.

``state_dict()`` is whole on every rank (with ``decompositions="owned"`` it gathers the
owners' blocks, which a sharded model may not have room for). :func:`sharded_state` is the
same state as a flat dict of tensors in which each rank puts only the curvature blocks it
holds (all of them unless ``"owned"``; DCP saves a key that several ranks hold once), the
per-parameter recursion vectors (whole, the same on every rank) and one ``meta`` entry
with the rest. The caller saves it with DCP, which writes the files (the library writes
none); :func:`load_sharded_state` reads back what this rank needs under the *current*
ownership, so a run saved at ``R`` ranks resumes at another number (``docs/distributed.md``):

    import torch.distributed.checkpoint as dcp
    dcp.save({"model": get_model_state_dict(model), "optim": sharded_state(opt)},
             checkpoint_id=path)
    ...
    load_sharded_state(opt, path, key="optim")   # after the model's own load
"""

from __future__ import annotations

import io
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

from ...distributed import rank
from ..base import CurvatureOptimizer


def _rule(opt: Any) -> CurvatureOptimizer:
    if not isinstance(opt, CurvatureOptimizer):
        raise TypeError(f"expected a kldwrm optimizer (KFAC, SOKLDWRM, QKLDWRM, QEKLDWRM), got "
                        f"{type(opt).__name__}")
    return opt


def sharded_state(opt: CurvatureOptimizer) -> dict[str, Any]:
    """This rank's part of the state, for ``torch.distributed.checkpoint.save`` (no
    collective: every rank calls it and passes it to ``dcp.save``)."""
    opt = _rule(opt)
    sd = Optimizer.state_dict(opt)
    out: dict[str, Any] = {}
    other: dict[int, dict[str, Any]] = {}
    for i, st in sd["state"].items():
        for name, v in st.items():
            if isinstance(v, Tensor):
                out[f"state/{i}/{name}"] = v
            else:
                other.setdefault(i, {})[name] = v
    engine = opt.engine
    for bi, b in enumerate(engine.blocks):
        if not engine._remote(bi):
            for name, t in b.state_dict().items():
                out[f"curvature/{bi}/{name}"] = t
    meta = {"param_groups": sd["param_groups"], "state_other": other,
            "kldwrm": opt._extra_state(None), "blocks": engine.block_keys()}
    out["meta"] = io.BytesIO()  # one opaque entry: DCP would flatten (and drop) its parts
    torch.save(meta, out["meta"])
    return out


def load_sharded_state(opt: CurvatureOptimizer, checkpoint_id: Any, key: str = "optim",
                       ) -> None:
    """Load what :func:`sharded_state` saved under ``key`` of a DCP checkpoint: every rank
    reads the whole recursion state and the curvature blocks it holds now (a collective:
    every rank calls it)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    opt = _rule(opt)
    reader = dcp.FileSystemReader(checkpoint_id)
    stored = reader.read_metadata().state_dict_metadata
    prefix = f"{key}."
    engine, me = opt.engine, rank()
    template: dict[str, Any] = {}
    saved_blocks = set()
    for fqn, md in stored.items():
        if not fqn.startswith(prefix):
            continue
        name = fqn[len(prefix):]
        if name.startswith("curvature/"):
            bi = int(name.split("/")[1])
            saved_blocks.add(bi)
            if engine.owners().get(bi, me) != me:
                continue
        template[name] = (torch.empty(md.size, dtype=md.properties.dtype)
                          if isinstance(md, TensorStorageMetadata) else io.BytesIO())
    if "meta" not in template:
        raise ValueError(f"no kldwrm optimizer state under {key!r} in {checkpoint_id!r}")
    dcp.load({key: template}, checkpoint_id=checkpoint_id)
    opt.load_state_dict(_whole(template, saved_blocks))
    for bi in saved_blocks:  # held elsewhere now: only the flag is kept here
        engine.blocks[bi].initialized = True


def _whole(flat: dict[str, Any], saved_blocks: set[int]) -> dict[str, Any]:
    """The ``state_dict()`` layout again (blocks held by other ranks empty)."""
    flat["meta"].seek(0)
    meta = torch.load(flat["meta"], weights_only=False)
    state: dict[int, dict[str, Any]] = {int(i): dict(v) for i, v in meta["state_other"].items()}
    curvature: dict[str, dict[str, Tensor]] = {k: {} for k in meta["blocks"]}
    keys = list(meta["blocks"])
    for name, t in flat.items():
        if name == "meta":
            continue
        kind, _, rest = name.partition("/")
        if kind == "state":
            i, _, field = rest.partition("/")
            state.setdefault(int(i), {})[field] = t
        elif kind == "curvature":
            bi, _, field = rest.partition("/")
            curvature[keys[int(bi)]][field] = t
    return {"state": state, "param_groups": meta["param_groups"],
            "kldwrm": {**meta["kldwrm"], "curvature": curvature}}
