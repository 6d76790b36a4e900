r"""Cost against latent dimension: ms per step and peak memory of each flow family's default
guide (and the peers) on a hierarchical model with ``D`` group effects.

Model (non-centred hierarchical normal, ``D`` groups, one observation each, synthetic data):

.. math::

    \mu \sim \mathcal N(0, 5^2), \quad \tau \sim \mathcal N^+(0, 5^2), \quad
    \theta_d \sim \mathcal N(0, 1), \quad y_d \sim \mathcal N(\mu + \tau \theta_d, \sigma_d^2),

so the guide's latent vector has ``D + 2`` coordinates. Every (guide, D) cell runs in a fresh
subprocess with an address-space limit (``--memory-gb``) and a wall-clock limit
(``--timeout``): it builds the guide (its default start included: ``setup_s``), then takes
``fit``'s default steps (``Trace_ELBO()``, one particle; Adam decaying from 1e-2 to 1e-4) for
at most ``--max-steps`` steps or ``--step-seconds`` seconds, and reports the median ms per step
and the peak resident memory of the process (``resource.getrusage`` max RSS), also above the
process's peak before the guide was built (``rss_guide_mb``: imports, model and data
excluded). A cell that fails (time limit, memory, an error) is recorded with the reason; larger
``D`` for that guide are then skipped.

Example::

    python benchmarks/scaling.py --dims 10 100 1000 10000 --outdir docs
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
GUIDES = [
    "normal",
    "planar",
    "radial",
    "householder",
    "sylvester_orthogonal",
    "iaf",
    "spline",
    "spline_coupling",
    "realnvp",
    "naf",
    "pyro_iaf",
    "pyro_iaf_default",
    "pyro_nsf",
    "zuko_nsf",
]


def hierarchical(num_groups: int, seed: int = 0):
    """The model and its data (``y``, ``sigma``) for ``num_groups`` groups."""
    import pyro
    import pyro.distributions as dist
    import torch

    gen = torch.Generator().manual_seed(seed)
    dtype = torch.get_default_dtype()
    sigma = 0.5 + torch.rand(num_groups, generator=gen, dtype=torch.float64)
    theta = torch.randn(num_groups, generator=gen, dtype=torch.float64)
    y = 1.0 + 2.0 * theta + sigma * torch.randn(num_groups, generator=gen, dtype=torch.float64)

    def model(y: torch.Tensor, sigma: torch.Tensor) -> None:
        mu = pyro.sample("mu", dist.Normal(0.0, 5.0))
        tau = pyro.sample("tau", dist.HalfNormal(5.0))
        with pyro.plate("groups", y.shape[-1], dim=-1):
            theta = pyro.sample("theta", dist.Normal(0.0, 1.0))
            pyro.sample("y", dist.Normal(mu + tau * theta, sigma), obs=y)

    return model, (y.to(dtype), sigma.to(dtype))


def build(name: str, model, args: tuple, dim: int):
    sys.path.insert(0, str(HERE))
    import flow_guides

    from pyro_flowvi.benchmarks.synthetic import Target

    target = Target("hierarchical", model, args, None, dim)
    if name == "zuko_nsf":
        import zuko_peer

        return zuko_peer.zuko_nsf_guide(target)
    return flow_guides.build_guide(name, model, target, "elbo")


def worker(args: argparse.Namespace) -> dict:
    """One cell, in this process: build, step, measure; returns the row."""
    import pyro
    import torch
    from pyro.infer import SVI, Trace_ELBO

    sys.path.insert(0, str(HERE))
    import flow_guides

    torch.set_num_threads(1)
    torch.set_default_dtype(torch.float32)
    pyro.enable_validation(False)
    pyro.set_rng_seed(0)
    model, data = hierarchical(args.dim)
    row = {"guide": args.guide, "dim": args.dim, "latent_dim": args.dim + 2}
    base_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    begin = time.perf_counter()
    guide = build(args.guide, model, data, args.dim + 2)
    guide(*data)
    row["setup_s"] = time.perf_counter() - begin
    row["num_params"] = sum(p.numel() for _, p in pyro.get_param_store().named_parameters())
    svi = SVI(model, guide, flow_guides.default_optim(args.max_steps), Trace_ELBO())
    times = []
    started = time.perf_counter()
    for _ in range(args.max_steps):
        tick = time.perf_counter()
        loss = svi.step(*data)
        times.append(time.perf_counter() - tick)
        if time.perf_counter() - started > args.step_seconds and len(times) >= 5:
            break
    peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    kept = times[2:] if len(times) > 4 else times
    row.update(
        steps=len(times),
        ms=1e3 * statistics.median(kept),
        last_loss=float(loss),
        rss_mb=peak_kb / 1024,
        rss_guide_mb=(peak_kb - base_kb) / 1024,
        error="",
    )
    return row


def run_cell(guide: str, dim: int, args: argparse.Namespace) -> dict:
    """Run one cell in a subprocess with the memory and time limits."""
    limit = int(args.memory_gb * 2**30)

    def limits() -> None:
        os.nice(10)
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))

    command = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--worker",
        "--guide",
        guide,
        "--dim",
        str(dim),
        "--max-steps",
        str(args.max_steps),
        "--step-seconds",
        str(args.step_seconds),
    ]
    row = {"guide": guide, "dim": dim, "latent_dim": dim + 2}
    begin = time.perf_counter()
    try:
        done = subprocess.run(
            command,
            capture_output=True,
            text=True,
            timeout=args.timeout,
            preexec_fn=limits,
            cwd=HERE.parent,
        )
    except subprocess.TimeoutExpired:
        row["error"] = f"time limit: more than {args.timeout:g} s (setup and steps)"
        return row
    row["wall_s"] = time.perf_counter() - begin
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode == 0 and lines:
        row.update(json.loads(lines[-1]))
        return row
    tail = (done.stderr.strip().splitlines() or ["(no output)"])[-1]
    if "MemoryError" in done.stderr or "DefaultCPUAllocator" in done.stderr:
        row["error"] = f"memory: over the {args.memory_gb:g} GB address-space limit ({tail[:160]})"
    elif done.returncode < 0:
        row["error"] = f"killed by signal {-done.returncode} ({tail[:160]})"
    else:
        row["error"] = f"exit {done.returncode}: {tail[:200]}"
    return row


def plot(rows: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8))
    guides = list(dict.fromkeys(r["guide"] for r in rows))
    cmap = plt.get_cmap("tab20")
    for i, guide in enumerate(guides):
        ok = sorted((r for r in rows if r["guide"] == guide and not r.get("error")), key=_dim)
        failed = [r for r in rows if r["guide"] == guide and r.get("error")]
        style = "--" if guide in ("normal",) or guide.startswith(("pyro_", "zuko_")) else "-"
        color = cmap(i % 20)
        for ax, key in zip(axes, ("ms", "rss_mb"), strict=True):
            xs = [r["latent_dim"] for r in ok]
            ys = [r[key] for r in ok]
            ax.plot(xs, ys, style, marker="o", color=color, label=guide)
            for r in failed:
                if r["error"].startswith("skipped"):
                    continue
                top = max([row.get(key, 0) or 0 for row in rows if not row.get("error")] or [1])
                ax.plot([r["latent_dim"]], [top * 1.5], "x", color=color, markersize=9)
    axes[0].set_ylabel("ms per step (median)")
    axes[1].set_ylabel("peak resident memory of the process (MB)")
    for ax in axes:
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("latent dimension (D + 2)")
        ax.grid(True, which="both", alpha=0.3)
    axes[0].set_title("time per step (x above the curves: failed)")
    axes[1].set_title("peak memory")
    axes[1].legend(fontsize=7, ncol=2, loc="upper left")
    fig.suptitle("Hierarchical normal model, fit's default step (1 particle), float32, 1 thread")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def _dim(row: dict) -> int:
    return row["dim"]


def write_outputs(rows: list[dict], args: argparse.Namespace, meta: dict) -> None:
    os.makedirs(args.outdir, exist_ok=True)
    with open(os.path.join(args.outdir, "scaling.json"), "w") as f:
        json.dump({"command": args.command, "meta": meta, "rows": rows}, f, indent=1)
    plot(rows, os.path.join(args.outdir, "scaling_flow_guides.png"))
    fmt = _fmt
    lines = [
        "```",
        args.command,
        "```",
        "",
        f"Commit {meta['commit']}, {meta['date']}, 1-minute load average "
        f"{meta['load'][0]:.1f} at the start on {os.cpu_count()} cores; limits "
        f"{args.memory_gb:g} GB of address space and {args.timeout:g} s per cell.",
        "",
        "| guide | D | setup s | ms/step | steps | peak RSS MB | above pre-guide MB | "
        "parameters | failure |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['guide']} | {r['latent_dim']} | {fmt(r.get('setup_s'), 1)} | "
            f"{fmt(r.get('ms'), 2)} | {r.get('steps', '')} | {fmt(r.get('rss_mb'), 0)} | "
            f"{fmt(r.get('rss_guide_mb'), 0)} | {r.get('num_params', '')} | "
            f"{r.get('error', '')} |"
        )
    with open(os.path.join(args.outdir, "scaling.md"), "w") as f:
        f.write("\n".join(lines) + "\n")


def _fmt(value: object, digits: int) -> str:
    if value is None or value == "":
        return "n/a"
    value = float(value)
    return "n/a" if math.isnan(value) else f"{value:.{digits}f}"


def main(args: argparse.Namespace) -> list[dict]:
    if args.worker:
        row = worker(args)
        print(json.dumps(row), flush=True)
        return [row]
    sys.path.insert(0, str(HERE))
    import flow_guides

    meta = flow_guides.run_metadata()
    rows, failed = [], {}
    for dim in sorted(args.dims):
        for guide in args.guides:
            if guide in failed:
                rows.append(
                    {
                        "guide": guide,
                        "dim": dim,
                        "latent_dim": dim + 2,
                        "error": f"skipped: failed at D = {failed[guide]}",
                    }
                )
                continue
            row = run_cell(guide, dim, args)
            if row.get("error"):
                failed[guide] = dim
            rows.append(row)
            print(
                f"  {guide:>22} D={dim:>6}  setup {row.get('setup_s', math.nan):7.1f} s  "
                f"{row.get('ms', math.nan):9.2f} ms  {row.get('rss_mb', math.nan):7.0f} MB  "
                f"{row.get('error', '')}",
                file=sys.stderr,
                flush=True,
            )
            write_outputs(rows, args, meta)
    return rows


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dims", type=int, nargs="+", default=[10, 100, 1000, 10000])
    parser.add_argument("--guides", nargs="+", default=GUIDES)
    parser.add_argument("--max-steps", type=int, default=30)
    parser.add_argument("--step-seconds", type=float, default=30.0)
    parser.add_argument("--timeout", type=float, default=300.0)
    parser.add_argument("--memory-gb", type=float, default=5.0)
    parser.add_argument("--outdir", default="/tmp/scaling")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--guide", help=argparse.SUPPRESS)
    parser.add_argument("--dim", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.command = "python benchmarks/scaling.py " + " ".join(
        sys.argv[1:] if argv is None else argv
    )
    return args


if __name__ == "__main__":
    main(parse_args())
