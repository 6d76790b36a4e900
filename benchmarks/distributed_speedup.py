"""Speed-up of data-parallel SVI on CPU: one process against two, for a BNN and a VAE.

Runs ``examples/distributed_bnn.py`` under ``torchrun`` for each model (``bnn``: a Bayesian MLP
64-100-10 with the MNF guide; ``vae``: the amortized-flow VAE with a global latent) and each
configuration, one run at a time and interleaved over ``--repeats`` rounds so that a change of
the machine's load hits every configuration alike:

- ``1x1``: one process, one torch thread (the baseline);
- ``1x2``: one process, two torch threads (intra-op parallelism on the same two cores);
- ``2x1``: two processes of one thread each, each on half of every mini-batch (the same
  global batch of ``--batch-size``), gradients averaged by ``fit(distributed=True)``.

It also times one gloo all-reduce of each model's gradient buffer between two processes (the
communication a data-parallel step adds). Prints a Markdown table (median over the rounds of
the seconds per epoch; the training ELBO per point over the last epoch; the test figure of the
last round) and, with ``--out``, writes every run as JSON.

Example::

    nice -n 10 python benchmarks/distributed_speedup.py --num-epochs 30 --repeats 3 \\
        --out distributed_speedup.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ((1, 1), (1, 2), (2, 1))  # (processes, threads per process), as "1x1", ...
MODELS = ("bnn", "vae")


def run_example(model: str, procs: int, threads: int, args: argparse.Namespace) -> dict:
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={procs}",
        str(ROOT / "examples" / "distributed_bnn.py"),
        "--model",
        model,
        "--num-epochs",
        str(args.num_epochs),
        "--batch-size",
        str(args.batch_size),
        "--threads",
        str(threads),
        "--seed",
        str(args.seed),
        "--quiet",
    ]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": str(threads)}
    done = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{done.stderr[-4000:]}")
    line = [text for text in done.stdout.splitlines() if text.startswith("{")][-1]
    return json.loads(line)


def measure_allreduce(sizes: list[int], repeats: int) -> dict[int, float] | None:
    """In a torchrun process: median seconds of one all-reduce of ``size + 8`` float32
    numbers (the gradients, the loss and the flags) per size; rank 0 returns them."""
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    result = {}
    for size in sizes:
        buffer = torch.zeros(size + 8)
        for _ in range(10):
            dist.all_reduce(buffer)
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            dist.all_reduce(buffer)
            times.append(time.perf_counter() - start)
        result[size] = statistics.median(times)
    rank = dist.get_rank()
    dist.destroy_process_group()
    return result if rank == 0 else None


def allreduce_latency(sizes: list[int], repeats: int = 200) -> dict[int, float]:
    """Median seconds of one gloo all-reduce of each size between two torchrun processes."""
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        str(Path(__file__).resolve()),
        "--allreduce-sizes",
        *map(str, sizes),
        "--allreduce-repeats",
        str(repeats),
    ]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{done.stderr[-4000:]}")
    line = [text for text in done.stdout.splitlines() if text.startswith("{")][-1]
    return {int(k): v for k, v in json.loads(line).items()}


def table(runs: list[dict], latency: dict[int, float]) -> str:
    lines = [
        "| model | processes x threads | s / epoch (median) | speed-up vs 1x1 | ms / step | "
        "all-reduce, ms | train ELBO / point | test |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for model in MODELS:
        mine = [r for r in runs if r["model"] == model]
        if not mine:
            continue
        base = None
        for procs, threads in CONFIGS:
            these = [r for r in mine if r["world_size"] == procs and r["threads"] == threads]
            if not these:
                continue
            seconds = statistics.median(r["seconds_per_epoch"] for r in these)
            step = statistics.median(r["ms_per_step"] for r in these)
            base = seconds if (procs, threads) == (1, 1) else base
            speedup = f"{base / seconds:.2f}" if base else "n/a"
            reduce = f"{1000 * latency[these[-1]['num_params']]:.2f}" if procs > 1 else "-"
            elbo = statistics.median(r["train_elbo_per_point"] for r in these)
            test = these[-1].get("test_accuracy", these[-1].get("test_elbo_per_image"))
            kind = "accuracy" if model == "bnn" else "ELBO / image"
            lines.append(
                f"| {model} ({these[-1]['num_params']} parameters) | {procs} x {threads} | "
                f"{seconds:.3f} | {speedup} | {step:.1f} | {reduce} | {elbo:.4f} | "
                f"{kind} {test:.4f} |"
            )
    return "\n".join(lines)


def main(args: argparse.Namespace) -> list[dict]:
    if args.allreduce_sizes:  # a torchrun process of allreduce_latency
        result = measure_allreduce(args.allreduce_sizes, args.allreduce_repeats)
        if result is not None:
            print(json.dumps(result))
        return []
    runs = []
    configs = [tuple(int(n) for n in text.split("x")) for text in args.configs]
    for round_ in range(args.repeats):
        for model in args.models:
            for procs, threads in configs:
                report = run_example(model, procs, threads, args)
                report["round"] = round_
                runs.append(report)
                print(
                    f"round {round_} {model} {procs}x{threads}: "
                    f"{report['seconds_per_epoch']:.3f} s/epoch",
                    flush=True,
                )
    latency = allreduce_latency(sorted({r["num_params"] for r in runs}))
    print(table(runs, latency))
    if args.out:
        Path(args.out).write_text(
            json.dumps({"runs": runs, "allreduce_seconds": latency}, indent=1)
        )
    return runs


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    p.add_argument("--num-epochs", type=int, default=30)
    p.add_argument("--batch-size", type=int, default=100)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument(
        "--configs",
        nargs="+",
        default=[f"{n}x{t}" for n, t in CONFIGS],
        choices=[f"{n}x{t}" for n, t in CONFIGS],
        help="processes x threads per process",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None)
    p.add_argument("--allreduce-sizes", type=int, nargs="*", help=argparse.SUPPRESS)
    p.add_argument("--allreduce-repeats", type=int, default=200, help=argparse.SUPPRESS)
    return p


if __name__ == "__main__":
    main(parser().parse_args())
