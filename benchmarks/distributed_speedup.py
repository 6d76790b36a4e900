"""Speed-up of data-parallel SVI on CPU: one process against two, for a BNN and a VAE.

Runs ``examples/distributed_bnn.py`` under ``torchrun`` for each model (``bnn``: a Bayesian MLP
64-100-10 with the MNF guide; ``vae``: the amortized-flow VAE with a global latent) and each
configuration, one run at a time and interleaved over ``--repeats`` rounds so that a change of
the machine's load hits every configuration alike:

- ``1x1``: one process, one torch thread (the baseline);
- ``1x2``: one process, two torch threads (intra-op parallelism on the same two cores);
- ``2x1``: two processes of one thread each, each on half of every mini-batch (the same
  global batch of ``--batch-size``), gradients averaged by ``fit(distributed=True)``;
- ``1x1/2``: one process, one thread, on half the batch (twice the steps per epoch). Its time
  per step is what each of the two processes computes per step; with the all-reduce added it
  bounds what two processes can gain: ``step(1x1) / (step(1x1/2) + all-reduce)``.

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
CONFIGS = ("1x1", "1x2", "2x1", "1x1/2")  # processes x threads per process [/2: half batch]
MODELS = ("bnn", "vae")


def parse_config(config: str) -> tuple[int, int, bool]:
    """``"2x1"`` -> (2 processes, 1 thread, full batch); ``"1x1/2"`` -> half the batch."""
    shape, _, half = config.partition("/")
    procs, threads = (int(n) for n in shape.split("x"))
    return procs, threads, half == "2"


def run_example(model: str, config: str, args: argparse.Namespace) -> dict:
    procs, threads, half = parse_config(config)
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
        str(args.batch_size // 2 if half else args.batch_size),
        "--threads",
        str(threads),
        "--seed",
        str(args.seed),
        "--quiet",
    ]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": str(threads)}
    failures = []
    for _ in range(2):  # a crashed run is repeated once, and the crash recorded
        done = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
        if done.returncode == 0:
            line = [text for text in done.stdout.splitlines() if text.startswith("{")][-1]
            return {**json.loads(line), "config": config, "crashed_before": failures}
        failures.append(done.stderr[-2000:])
        print(f"{model} {config} failed, once more:\n{done.stderr[-1000:]}", flush=True)
    raise RuntimeError(f"{' '.join(command)} failed twice:\n{done.stderr[-4000:]}")


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
        "all-reduce, ms | bound on the speed-up | train ELBO / point | test |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for model in MODELS:
        mine = [r for r in runs if r["model"] == model]
        medians = {}
        for config in CONFIGS:
            these = [r for r in mine if r["config"] == config]
            if these:
                medians[config] = (
                    statistics.median(r["seconds_per_epoch"] for r in these),
                    statistics.median(r["ms_per_step"] for r in these),
                    these,
                )
        for config, (seconds, step, these) in medians.items():
            procs = parse_config(config)[0]
            base = medians.get("1x1")
            speedup = f"{base[0] / seconds:.2f}" if base and not config.endswith("/2") else "-"
            params = these[-1]["num_params"]
            reduce = 1000 * latency[params] if procs > 1 else None
            bound = "-"
            if procs > 1 and base and "1x1/2" in medians:
                bound = f"{base[1] / (medians['1x1/2'][1] + reduce):.2f}"
            elbo = statistics.median(r["train_elbo_per_point"] for r in these)
            test = these[-1].get("test_accuracy", these[-1].get("test_elbo_per_image"))
            kind = "accuracy" if model == "bnn" else "ELBO / image"
            label = "1 x 1, half batch" if config.endswith("/2") else config.replace("x", " x ")
            lines.append(
                f"| {model} ({params} parameters) | {label} | {seconds:.3f} | {speedup} | "
                f"{step:.1f} | {'-' if reduce is None else f'{reduce:.2f}'} | {bound} | "
                f"{elbo:.4f} | {kind} {test:.4f} |"
            )
    return "\n".join(lines)


def main(args: argparse.Namespace) -> list[dict]:
    if args.allreduce_sizes:  # a torchrun process of allreduce_latency
        result = measure_allreduce(args.allreduce_sizes, args.allreduce_repeats)
        if result is not None:
            print(json.dumps(result))
        return []
    runs = []
    for round_ in range(args.repeats):
        for model in args.models:
            for config in args.configs:
                report = run_example(model, config, args)
                report["round"] = round_
                runs.append(report)
                print(
                    f"round {round_} {model} {config}: {report['seconds_per_epoch']:.3f} s/epoch",
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
        default=list(CONFIGS),
        choices=CONFIGS,
        help="processes x threads per process; /2: one process on half the batch",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None)
    p.add_argument("--allreduce-sizes", type=int, nargs="*", help=argparse.SUPPRESS)
    p.add_argument("--allreduce-repeats", type=int, default=200, help=argparse.SUPPRESS)
    return p


if __name__ == "__main__":
    main(parser().parse_args())
