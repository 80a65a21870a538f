"""Character-level transformer benchmark (issue 22): validation loss at equal steps and
the mean step time against AdamW, for the transformer preset of every rule.

Runs ``examples/char_lm.py``'s model, data and loop (same initialisation and batches for
every optimizer, one CPU thread), one optimizer after the other, for each seed; prints a
Markdown table (validation loss in nats per character at steps 150, 300 and the last;
seconds per step and its ratio to AdamW's measured in the same run) and writes the rows as
JSON. ``adam`` is AdamW at weight decay 0 (``torch.optim.Adam``, the same update).

    python -m benchmarks.lm --steps 600 --seeds 0,1,2 --out docs/results/lm.json
    python -m benchmarks.lm --steps 2000 --d-model 128 --layers 4 --seeds 0   # larger size

Peers (SOAP, kfac-pytorch) are not imported here: they are never dependencies; their
figures in docs/benchmarks.md come from the issue's measurement with their released code.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import sys
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parent.parent


def _example():
    """``examples/char_lm.py``, the benchmark's workload (the examples are not a package)."""
    spec = importlib.util.spec_from_file_location("char_lm", REPO_ROOT / "examples" / "char_lm.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["char_lm"] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


char_lm = _example()

NAMES = ("adam", "sgd", "kfac", "so", "q")


def run(name: str, seed: int, args: argparse.Namespace) -> dict:
    """One optimizer's run at ``seed``: its evaluation points and seconds per step."""
    text = char_lm.load_text()
    vocab = char_lm.Vocab.from_text(text)
    train, val = char_lm.split_tokens(vocab.encode(text))
    starts = char_lm.batch_starts(len(train), args.context, args.batch_size, args.steps, seed)
    train_eval = char_lm.eval_windows(train, args.context, 128)
    val_eval = char_lm.eval_windows(val, args.context, 128)
    model = char_lm.build_model(len(vocab), d_model=args.d_model, n_heads=args.heads,
                                n_layers=args.layers, context=args.context, seed=seed)
    torch.manual_seed(seed)
    result = char_lm.train_one(name, model, train, starts, args.context, train_eval, val_eval,
                               eval_every=25, seed=seed, log=None,
                               settings=char_lm.optimizer_settings(name, seed))
    return {"optimizer": name, "seed": seed, "steps": args.steps,
            "d_model": args.d_model, "layers": args.layers,
            "val": {str(s): v for s, _, _, v in result.evals},
            "seconds": {str(s): t for s, t, _, _ in result.evals},
            "s_per_step": result.seconds / args.steps}


def table(rows: list[dict], steps: int) -> str:
    """Markdown: per optimizer, the mean (and per-seed) validation loss and step time."""
    marks = [s for s in (150, 300, 600, 2000) if s < steps] + [steps]
    out = ["| optimizer | " + " | ".join(f"step {s}" for s in marks)
           + " | s/step | x AdamW |", "|---" * (len(marks) + 3) + "|"]
    adam = {r["seed"]: r["s_per_step"] for r in rows if r["optimizer"] == "adam"}
    for name in dict.fromkeys(r["optimizer"] for r in rows):
        mine = [r for r in rows if r["optimizer"] == name]
        cells = []
        for s in marks:
            vals = [r["val"][str(s)] for r in mine]
            per = "/".join(f"{v:.3f}" for v in vals)
            cells.append(f"{statistics.mean(vals):.3f} ({per})" if len(vals) > 1 else per)
        sps = statistics.median(r["s_per_step"] for r in mine)
        ratio = statistics.median(r["s_per_step"] / adam[r["seed"]] for r in mine
                                  if r["seed"] in adam) if adam else float("nan")
        out.append(f"| {name} | " + " | ".join(cells) + f" | {sps:.4f} | {ratio:.2f} |")
    return "\n".join(out)


def plot(rows: list[dict], path: Path) -> None:
    """Mean validation loss over seeds against steps and against training seconds."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 4.2), layout="constrained")
    FigureCanvasAgg(fig)
    by_step, by_time = fig.subplots(1, 2, sharey=True)
    for name in dict.fromkeys(r["optimizer"] for r in rows):
        mine = [r for r in rows if r["optimizer"] == name]
        steps = [int(s) for s in mine[0]["val"]]
        val = [statistics.mean(r["val"][str(s)] for r in mine) for s in steps]
        secs = [statistics.mean(r["seconds"][str(s)] for r in mine) for s in steps]
        label = char_lm.LABELS.get(name, name).replace("Adam", "AdamW")
        by_step.plot(steps, val, label=label)
        by_time.plot(secs, val, label=label)
    by_step.set_xlabel("step")
    by_time.set_xlabel("training seconds (one thread)")
    by_step.set_ylabel("validation loss (nats per character)")
    by_step.set_ylim(1.2, 3.2)
    for ax in (by_step, by_time):
        ax.grid(alpha=0.3)
    by_step.legend()
    seeds = sorted({r["seed"] for r in rows})
    fig.suptitle(f"char-LM, transformer preset, mean of seeds {seeds}")
    fig.savefig(path, dpi=100)


def page(rows: list[dict], steps: int, command: str) -> str:
    """The Markdown page: how it was measured, the table, the plot."""
    return "\n".join([
        "# Character-level transformer benchmark (issue 22)", "",
        f"Measured with `{command}` (`benchmarks/lm.py`): `examples/char_lm.py`'s default",
        "model (112k parameters), batches of 32 windows x 64 characters, one CPU thread, the",
        "same initialisation and batches for every optimizer; each curvature rule with",
        "`preset=\"transformer\"` (tuned on seed 0 only), `adam` is AdamW at lr 3e-3 and",
        "weight decay 0, `sgd` SGD with momentum 0.9 at lr 0.1. Validation loss in nats per",
        "character (mean over seeds, each seed in brackets); s/step is the median over seeds",
        "of the training time per step, `x AdamW` the median ratio to AdamW's in the same run.",
        "", table(rows, steps), "", "![validation loss](results/lm.png)", "",
        "SOAP and kfac-pytorch were measured by issue 22 with their released code (seed 0, 600",
        "steps): SOAP 1.38 and kfac-pytorch's K-FAC under SGD momentum 2.00; they were not",
        "re-run beside these rows.", "",
    ])


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
    p.add_argument("--out", type=Path, default=None, help="JSON file for the rows")
    p.add_argument("--page", type=Path, default=None,
                   help="Markdown page (table and plot, the PNG beside it in results/)")
    p.add_argument("--from-json", type=Path, default=None,
                   help="render --page from rows stored by --out instead of running")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    if args.from_json is not None:
        rows = json.loads(args.from_json.read_text())
    else:
        rows = []
        for seed in (int(s) for s in args.seeds.split(",")):
            for name in args.optimizers.split(","):
                rows.append(run(name, seed, args))
                print(f"seed {seed} {name}: val {rows[-1]['val'][str(args.steps)]:.3f}, "
                      f"{rows[-1]['s_per_step']:.4f} s/step", flush=True)
    steps = rows[0]["steps"]
    print(table(rows, steps))
    if args.out is not None and args.from_json is None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(rows, indent=1))
    if args.page is not None:
        png = args.page.parent / "results" / "lm.png"
        png.parent.mkdir(parents=True, exist_ok=True)
        plot(rows, png)
        command = f"python -m benchmarks.lm --steps {steps} --seeds " + ",".join(
            str(s) for s in dict.fromkeys(r["seed"] for r in rows))
        args.page.write_text(page(rows, steps, command))
    return rows


if __name__ == "__main__":
    main()
