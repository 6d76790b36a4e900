r"""VAE posterior families on binarized digits: test -ELBO, importance-sampled -log p(x), speed.

Runs ``examples/vae_flows.py`` (every family of :class:`pyro_flowvi.amortized.FlowEncoder`,
the families of one seed trained in lockstep on the same mini-batches) and writes
``docs/vae_benchmark.md`` (the summary over seeds, the per-seed numbers, the settings and the
exact command) and ``docs/vae_benchmark.png`` (reconstructions and prior samples of the first
seed). The reference ordering is van den Berg et al. (2018, Table 2, static MNIST):
-ELBO VAE 86.55 > planar 86.06 > IAF 84.20 > Sylvester 83.32-83.40.

Example (the settings of the committed table, about 20 minutes on 2 busy CPU cores)::

    python benchmarks/vae_flows.py --num-epochs 60 --num-seeds 3

References:
    Sylvester Normalizing Flows for Variational Inference (van den Berg et al., 2018,
    arXiv 1803.05649)
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time

import pyro
import torch

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir)
PAPER = {
    "gaussian": "86.55",
    "planar": "86.06",
    "iaf": "84.20",
    "sylvester (orthogonal, Householder, triangular)": "83.32-83.40",
}


def load_example():
    path = os.path.join(ROOT, "examples", "vae_flows.py")
    spec = importlib.util.spec_from_file_location("vae_flows_example", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def per_seed_table(results: list[dict]) -> str:
    lines = [
        "| posterior | seed | train -ELBO (last epoch) | test -ELBO | test -log p(x) | "
        "s / epoch | vs Gaussian |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in sorted(results, key=lambda r: (r["seed"], 0)):
        lines.append(
            f"| {r['family']} | {r['seed']} | {r['train_neg_elbo']:.2f} | "
            f"{r['test_neg_elbo']:.2f} | {r['test_neg_log_px']:.2f} | "
            f"{r['seconds_per_epoch']:.3f} | {r.get('time_ratio', float('nan')):.2f} |"
        )
    return "\n".join(lines)


def paired_table(results: list[dict]) -> str:
    """Each flow minus the Gaussian encoder of the same seed (same mini-batches, same eval RNG)."""
    gaussian = {r["seed"]: r for r in results if r["family"] == "gaussian"}
    lines = [
        "| posterior | Δ test -ELBO (mean ± se) | seeds below Gaussian | "
        "Δ test -log p(x) (mean ± se) | seeds below Gaussian |",
        "|---|---|---|---|---|",
    ]
    for name in dict.fromkeys(r["family"] for r in results):
        if name == "gaussian":
            continue
        rows = [r for r in results if r["family"] == name and r["seed"] in gaussian]
        cells = []
        for key in ("test_neg_elbo", "test_neg_log_px"):
            diffs = [r[key] - gaussian[r["seed"]][key] for r in rows]
            mean = statistics.fmean(diffs)
            se = statistics.stdev(diffs) / math.sqrt(len(diffs)) if len(diffs) > 1 else 0.0
            cells.append(f"{mean:+.3f} ± {se:.3f} | {sum(d < 0 for d in diffs)}/{len(diffs)}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def ordering_notes(table: list[dict], results: list[dict]) -> str:
    by_name = {e["family"]: e for e in table}
    if "gaussian" not in by_name:
        return ""
    gaussian = by_name["gaussian"]["test_neg_elbo"]
    flows = [e for e in table if e["family"] != "gaussian"]
    below = [e["family"] for e in flows if e["test_neg_elbo"] < gaussian]
    above = [e["family"] for e in flows if e["test_neg_elbo"] >= gaussian]
    ranked = " < ".join(
        f"{e['family']} {e['test_neg_elbo']:.2f}"
        for e in sorted(table, key=lambda e: e["test_neg_elbo"])
    )
    seeds = {r["seed"] for r in results}
    clear = []
    for e in flows:
        diffs = [
            r["test_neg_elbo"] - g["test_neg_elbo"]
            for r in results
            if r["family"] == e["family"]
            for g in results
            if g["family"] == "gaussian" and g["seed"] == r["seed"]
        ]
        if len(diffs) > 1:
            se = statistics.stdev(diffs) / math.sqrt(len(diffs))
            if abs(statistics.fmean(diffs)) > 2 * se:
                clear.append(f"{e['family']} ({statistics.fmean(diffs):+.2f})")
    lines = [
        f"- Ranking by mean test -ELBO (lower is better): {ranked}.",
        f"- Mean test -ELBO below the Gaussian encoder's ({gaussian:.2f}): "
        f"{', '.join(below) if below else 'none'}; not below: "
        f"{', '.join(above) if above else 'none'}.",
        f"- Paired differences from the Gaussian more than two standard errors from zero over "
        f"{len(seeds)} seeds: {', '.join(clear) if clear else 'none'}.",
    ]
    return "\n".join(lines)


def write_markdown(path: str, example_args, table, results, command, wall, example):
    paper_rows = "\n".join(f"| {name} | {value} |" for name, value in PAPER.items())
    text = f"""# VAE posterior families on binarized digits

Generated by `benchmarks/vae_flows.py`; the tutorial is [amortized.md](amortized.md).

Command (wall time {wall / 60:.1f} min on {platform.machine()} with torch
{torch.__version__}, pyro {pyro.__version__}, {example_args.threads} thread(s), on a shared
2-core machine):

```
{command}
```

Settings: scikit-learn digits (8x8), binarized at half intensity, 1,497 training and 300 test
images (fixed split); latent size {example_args.latent_dim}; encoder and decoder MLPs with two
hidden layers of {example_args.hidden_dim} ELU units; {example_args.num_transforms} flow layers
per family (IAF: a reversal between layers, MADE hidden widths max(2L, 8); Sylvester: M = L,
Householder-Q with min(L, 8) reflections, triangular alternating identity/reversal);
Adam (`ClippedAdam`, clip norm 10) with learning rate {example_args.learning_rate}, batch
{example_args.batch_size}, {example_args.num_epochs} epochs; `Trace_ELBO` with one particle;
seeds {example_args.seed}..{example_args.seed + example_args.num_seeds - 1}. Test -ELBO and
-log p(x) use the same {example_args.is_samples} draws of q(z | x) per test point (the ELBO as
the mean log weight, -log p(x) as -logsumexp + log S), in nats per image. Time per epoch is the
median SVI step times the steps per epoch, as a ratio to the Gaussian encoder trained in
lockstep in the same run.

## Summary (mean ± sd over seeds)

{example.format_table(table)}

{ordering_notes(table, results)}

## Paired with the Gaussian encoder of the same seed

{paired_table(results)}

## Per seed

{per_seed_table(results)}

## Reference: van den Berg et al. (2018), Table 2, static MNIST, -ELBO

| posterior | -ELBO |
|---|---|
{paper_rows}

(Static MNIST is 28x28 with a 64-dimensional latent there; digits are 8x8 with 1,497
training images, so absolute values are not comparable, only the ordering.)

![Test digits, reconstructions and prior samples](vae_benchmark.png)
"""
    with open(path, "w") as f:
        f.write(text)


def main(args: argparse.Namespace) -> None:
    example = load_example()
    workdir = args.workdir or tempfile.mkdtemp(prefix="vae_flows_")
    meta_path = os.path.join(workdir, "benchmark_meta.json")
    if args.render_only:
        # rewrite the page from a finished run (its results, settings, command and wall time)
        with open(meta_path) as f:
            meta = json.load(f)
        example_args = argparse.Namespace(**meta["example_args"])
        command, wall = meta["command"], meta["wall_seconds"]
        with open(os.path.join(workdir, "vae_flows.json")) as f:
            saved = json.load(f)
        results, table = saved["results"], saved["summary"]
    else:
        example_args = example.parser().parse_args(
            [
                "--num-epochs", str(args.num_epochs),
                "--num-seeds", str(args.num_seeds),
                "--seed", str(args.seed),
                "--outdir", workdir,
                "--latent-dim", str(args.latent_dim),
                "--hidden-dim", str(args.hidden_dim),
                "--num-transforms", str(args.num_transforms),
                "--learning-rate", str(args.learning_rate),
                "--batch-size", str(args.batch_size),
                "--is-samples", str(args.is_samples),
            ]
        )  # fmt: skip
        start = time.time()
        table = example.main(example_args)
        wall = time.time() - start
        with open(os.path.join(workdir, "vae_flows.json")) as f:
            results = json.load(f)["results"]
        command = ("python benchmarks/vae_flows.py " + " ".join(sys.argv[1:])).strip()
        with open(meta_path, "w") as f:
            json.dump(
                {"command": command, "wall_seconds": wall, "example_args": vars(example_args)}, f
            )
    os.makedirs(args.docs, exist_ok=True)
    shutil.copyfile(
        os.path.join(workdir, "vae_flows.png"), os.path.join(args.docs, "vae_benchmark.png")
    )
    write_markdown(
        os.path.join(args.docs, "vae_benchmark.md"),
        example_args,
        table,
        results,
        command,
        wall,
        example,
    )
    print(f"wrote {args.docs}/vae_benchmark.md ({wall / 60:.1f} min of training and evaluation)")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--num-epochs", type=int, default=60)
    p.add_argument("--num-seeds", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--latent-dim", type=int, default=8)
    p.add_argument("--hidden-dim", type=int, default=128)
    p.add_argument("--num-transforms", type=int, default=4)
    p.add_argument("--learning-rate", type=float, default=3e-3)
    p.add_argument("--batch-size", type=int, default=100)
    p.add_argument("--is-samples", type=int, default=1000)
    p.add_argument("--docs", default=os.path.normpath(os.path.join(ROOT, "docs")))
    p.add_argument("--workdir", default=None, help="where the example's CSV/JSON/PNG go")
    p.add_argument(
        "--render-only",
        action="store_true",
        help="rewrite the page from the finished run in --workdir, without training",
    )
    return p


if __name__ == "__main__":
    main(parser().parse_args())
