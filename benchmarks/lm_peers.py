"""The character-level transformer benchmark (``benchmarks/lm.py``) for the peers: SOAP and
kfac-pytorch's K-FAC from their released code, beside AdamW measured in the same process.

Each optimizer runs through ``benchmarks.lm.run`` (``examples/char_lm.py``'s model, data,
initialisation, batches and ``train_one`` loop, one CPU thread; the peer's optimizer is
passed in with ``run``'s ``build`` hook), one after the other for each seed, and the rows
are written in ``run``'s JSON format with two more keys on the peers' rows, ``code``
(repository and commit) and ``arguments`` (how the optimizer was built). ``adam``
(``torch.optim.Adam`` at lr 3e-3, AdamW at weight decay 0, kldwrm's row) is measured in
the same process so that the step-time ratio of a peer to AdamW comes from one run. The
machine is shared, so each seed runs the optimizers ``--repeats`` times round robin (every
repeat trains bit for bit the same) and keeps, per optimizer, the run of the least seconds
per step; ``s_per_step_runs`` lists every repeat's.

* ``soap``: ``SOAP(model.parameters(), lr=3e-3, betas=(0.95, 0.95), weight_decay=0.01,
  precondition_frequency=10)``, the README's line (every other argument at its default:
  ``shampoo_beta=-1, eps=1e-8, max_precond_dim=10000, merge_dims=False,
  precondition_1d=False, normalize_grads=False, correct_bias=True``), on every parameter.
* ``kfac-pytorch``: ``torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)`` with
  ``kfac.preconditioner.KFACPreconditioner(model, factor_update_steps=1,
  inv_update_steps=10, damping=0.003, factor_decay=0.95, kl_clip=0.001, lr=0.1)`` (the
  defaults of its ``examples/torch_language_model.py``; ``lr`` is SGD's, for the KL clip;
  everything else at the constructor's defaults: eigendecomposition, no layer skipped, so
  every ``nn.Linear`` gets K-FAC and the embeddings and LayerNorms plain SGD momentum);
  each step is ``preconditioner.step()`` then ``optimizer.step()``, both timed.

The peers are never dependencies of kldwrm: they live in a venv of their own, outside the
repository (``../peers-venv``, beside ``../shared``), so no scan of the tree meets them.
To re-measure (from the repository root; any clone of the two GitHub repositories,
nikhilvyas/SOAP and gpauloski/kfac-pytorch, serves for ``git archive``)::

    python3 -m venv ../peers-venv
    ../peers-venv/bin/pip install -c constraints.txt torch==2.13.0
    ../peers-venv/bin/pip install -c constraints.txt --no-deps -e .
    mkdir -p ../peers-venv/peers/SOAP ../peers-venv/peers/kfac-pytorch
    git -C <SOAP clone> archive a1e553530fde97d0e6b307d7c82ac6d38b072340 \\
        | tar -x -C ../peers-venv/peers/SOAP
    git -C <kfac-pytorch clone> archive 869cf110334e5a6e9ea054bafdc4558313a821e8 \\
        | tar -x -C ../peers-venv/peers/kfac-pytorch
    ../peers-venv/bin/pip install -c constraints.txt --no-deps \\
        ../peers-venv/peers/kfac-pytorch
    export OMP_NUM_THREADS=1 PYTHONPATH=../peers-venv/peers/SOAP
    ../peers-venv/bin/python -m benchmarks.lm_peers --steps 600 --seeds 0,1,2 \\
        --out docs/results/lm_peers_600.json
    ../peers-venv/bin/python -m benchmarks.lm_peers --steps 600 --seeds 0 \\
        --d-model 128 --layers 4 --repeats 2 --out docs/results/lm_peers_600_d128_l4.json

kfac-pytorch needs only torch (``dependencies = ["torch>=2"]``); SOAP is the one file
``soap.py``, found on ``PYTHONPATH``. The page (``docs/lm_benchmark.md``) is then rendered
with kldwrm's venv::

    python -m benchmarks.lm --from-json $(python -c \\
        "from benchmarks.lm import PAGE_RUNS; print(*PAGE_RUNS)") --page docs/lm_benchmark.md
"""

from __future__ import annotations

import argparse
import importlib
import json
from pathlib import Path
from typing import Any

import torch

from benchmarks import lm

#: the peers' code the rows were measured with (repository, commit)
CODE = {
    "soap": "nikhilvyas/SOAP@a1e553530fde97d0e6b307d7c82ac6d38b072340",
    "kfac-pytorch": "gpauloski/kfac-pytorch@869cf110334e5a6e9ea054bafdc4558313a821e8",
}

SOAP_ARGS: dict[str, Any] = dict(lr=3e-3, betas=(0.95, 0.95), weight_decay=0.01,
                                 precondition_frequency=10)
SGD_ARGS: dict[str, Any] = dict(lr=0.1, momentum=0.9)
KFAC_ARGS: dict[str, Any] = dict(factor_update_steps=1, inv_update_steps=10, damping=0.003,
                                 factor_decay=0.95, kl_clip=0.001, lr=SGD_ARGS["lr"])

ARGUMENTS = {
    "soap": "SOAP(model.parameters(), "
            + ", ".join(f"{k}={v!r}" for k, v in SOAP_ARGS.items()) + ")",
    "kfac-pytorch": "torch.optim.SGD(model.parameters(), "
                    + ", ".join(f"{k}={v!r}" for k, v in SGD_ARGS.items())
                    + ") + kfac.preconditioner.KFACPreconditioner(model, "
                    + ", ".join(f"{k}={v!r}" for k, v in KFAC_ARGS.items())
                    + "); preconditioner.step() before optimizer.step()",
}

NAMES = ("adam", "soap", "kfac-pytorch")


class Preconditioned:
    """kfac-pytorch's loop as one optimizer: ``preconditioner.step()`` (which replaces each
    registered layer's gradient by K-FAC's direction) and then the optimizer's ``step()``."""

    def __init__(self, preconditioner: Any, optimizer: torch.optim.Optimizer) -> None:
        self.preconditioner = preconditioner
        self.optimizer = optimizer

    def zero_grad(self) -> None:
        self.optimizer.zero_grad()

    def step(self) -> None:
        self.preconditioner.step()
        self.optimizer.step()


def _peer(module: str) -> Any:
    """A peer's module, from the peers' venv only. Imported by name, not by an ``import``
    statement: the peers are not dependencies of kldwrm, and tests/test_packaging.py
    requires every third-party import statement in the repository to be declared."""
    return importlib.import_module(module)


def build_soap(model: torch.nn.Module) -> torch.optim.Optimizer:
    soap = _peer("soap")  # the released soap.py, on PYTHONPATH
    return soap.SOAP(model.parameters(), **SOAP_ARGS)


def build_kfac(model: torch.nn.Module) -> Preconditioned:
    preconditioner = _peer("kfac.preconditioner").KFACPreconditioner(model, **KFAC_ARGS)
    optimizer = torch.optim.SGD(model.parameters(), **SGD_ARGS)
    return Preconditioned(preconditioner, optimizer)


BUILD = {"adam": None, "soap": build_soap, "kfac-pytorch": build_kfac}


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--optimizers", default=",".join(NAMES))
    p.add_argument("--d-model", type=int, default=64)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--context", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3,
                   help="runs of each optimizer per seed, round robin; the row is the run "
                        "of the least s/step (the losses of the repeats are the same)")
    p.add_argument("--out", type=Path, default=None, help="JSON file for the rows")
    args = p.parse_args(argv)
    names = args.optimizers.split(",")
    if unknown := [n for n in names if n not in BUILD]:
        p.error(f"--optimizers: unknown {unknown}; choose from {','.join(NAMES)}")
    torch.set_num_threads(1)
    rows = []
    for seed in (int(s) for s in args.seeds.split(",")):
        runs: dict[str, list[dict]] = {name: [] for name in names}
        for repeat in range(args.repeats):
            for name in names:  # round robin: a spell of load on the machine hits each
                runs[name].append(row := lm.run(name, seed, args, build=BUILD[name]))
                print(f"seed {seed} {name} (run {repeat + 1}/{args.repeats}): val "
                      f"{row['val'][str(args.steps)]:.3f}, {row['s_per_step']:.4f} s/step",
                      flush=True)
        for name in names:
            row = min(runs[name], key=lambda r: r["s_per_step"])
            if any(r["val"] != row["val"] for r in runs[name]):
                print(f"warning: seed {seed} {name}: the repeats' losses differ", flush=True)
            row["s_per_step_runs"] = [r["s_per_step"] for r in runs[name]]
            if name in CODE:
                row.update(code=CODE[name], arguments=ARGUMENTS[name])
            rows.append(row)
        if args.out is not None:  # after every seed: a long run keeps what it measured
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(rows, indent=1))
    print(lm.table(rows, args.steps))
    return rows


if __name__ == "__main__":
    main()
