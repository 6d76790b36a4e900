r"""From an exact start, does a guide stay at the posterior under ``fit``'s default training?

Target: the correlated Gaussian ``rotated_gaussian(dim, decades=2)`` of
:mod:`pyro_flowvi.benchmarks.synthetic` (variances over two decades, a random rotation,
:math:`\log Z = 0`), at ``--dims`` (100 and 200). Every pyro-flowvi guide is built with its
defaults (``init_scale="auto"``, which finds the exact Laplace start on a Gaussian for most
families: ``init_choice`` says what it chose), then trained by :func:`pyro_flowvi.fit` with
its defaults (Adam decaying from 1e-2 to 1e-4, divergence guard on) for ``--num-steps``
(1000) steps, once per estimator: ``loss="elbo"`` (one particle), ``"stl"`` (one particle),
``"iw"`` (8 particles, DReG) and ``"default"`` (no loss and no particles given: the guide's
own default, :attr:`~pyro_flowvi.guides.AutoFlowGuide.default_loss` with
:attr:`~pyro_flowvi.guides.AutoFlowGuide.default_num_particles` vectorized particles).
Peers (``AutoNormal``, Pyro's ``AutoIAFNormal`` and ``AutoNormalizingFlow`` spline stack, the
zuko NSF guide of Pyro's tutorial in its own process) get the same calls from their own
starts.

Per cell: KL(q || p) = -ELBO at the start and after training, from ``--num-draws`` (2000)
fresh draws with its standard error, whether it ended within ``--tolerance`` (0.1), the PSIS
k-hat of those draws, ms per step, and the errors in mean and sd of ``--moment-draws`` draws of
the guide and of as many PSIS-resampled draws (see ``benchmarks/flow_guides.py``). A cell
that runs past ``--max-seconds`` is stopped like a Ctrl-C (``fit`` keeps a whole number of
steps) and reported with the steps it did; failures (non-finite steps, overflowing inverses)
are recorded as failures.

Results: one JSON per cell under ``--outdir``/cells (``--reuse`` keeps them), and
``exact_start.{md,csv}`` there.

Example::

    python benchmarks/exact_start.py --dims 100 --guides householder radial --outdir /tmp/es
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import signal
import subprocess
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import pyro
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import flow_guides  # noqa: E402

from pyro_flowvi.benchmarks.synthetic import Target, rotated_gaussian  # noqa: E402
from pyro_flowvi.fit import fit  # noqa: E402

HERE = Path(__file__).resolve().parent
OURS = [g for g in flow_guides.OURS if g != "iaf_t"]
PEERS = ["normal", "pyro_iaf", "pyro_iaf_default", "pyro_nsf", "zuko_nsf"]
DEFAULT_GUIDES = OURS + PEERS


def make_target(dim: int, decades: float) -> Target:
    return rotated_gaussian(dim, decades=decades)


class _Timeout:
    """Stop a :func:`fit` after ``seconds`` as a Ctrl-C would (it ends the loop cleanly)."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.fired = False

    def _handler(self, signum: int, frame: object) -> None:
        self.fired = True
        os.kill(os.getpid(), signal.SIGINT)

    def __enter__(self) -> _Timeout:
        if self.seconds > 0:
            self._previous = signal.signal(signal.SIGALRM, self._handler)
            signal.setitimer(signal.ITIMER_REAL, self.seconds)
        return self

    def __exit__(self, *exc: object) -> None:
        if self.seconds > 0:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, self._previous)


def kl_of(guide: Callable, target: Target, num_draws: int, seed: int) -> dict:
    pyro.set_rng_seed(seed)
    try:
        row = flow_guides.summarize(
            flow_guides.log_weights(target.model, guide, target.args, num_draws)
        )
    except (RuntimeError, ValueError, NotImplementedError) as error:
        row = flow_guides.summarize(torch.tensor([-math.inf]))
        row["eval_error"] = f"{type(error).__name__}: {str(error)[:160]}"
    row["kl"] = -row["elbo"]
    return row


def run_cell(
    name: str,
    build: Callable[[], Callable],
    target: Target,
    estimator: str,
    seed: int,
    args: argparse.Namespace,
) -> dict:
    """Build, score the start, ``fit`` with its defaults and this loss, score the end."""
    pyro.clear_param_store()
    pyro.set_rng_seed(seed)
    row: dict = {"dim": target.dim, "guide": name, "estimator": estimator, "seed": seed}
    begin = time.perf_counter()
    guide = build()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            guide(*target.args)
    except (RuntimeError, ValueError, NotImplementedError) as error:
        row["error"] = f"setup: {type(error).__name__}: {str(error)[:160]}"
        return row
    row["setup_s"] = time.perf_counter() - begin
    row["init_choice"] = str(getattr(guide, "init_choice", "") or "")
    start = kl_of(guide, target, args.num_draws, 10_000 + seed)
    row["kl_start"], row["kl_start_se"] = start["kl"], start["elbo_se"]
    pyro.set_rng_seed(seed)
    error = ""
    result = None
    with _Timeout(args.max_seconds) as timer, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            result = fit(
                target.model,
                guide,
                *target.args,
                num_steps=args.num_steps,
                loss=None if estimator == "default" else estimator,
                progress=False,
            )
        except (RuntimeError, ValueError, NotImplementedError) as failure:
            # NonFiniteLossError is a RuntimeError; the parameters are the last finite ones
            error = f"{type(failure).__name__}: {str(failure)[:200]}"
        except KeyboardInterrupt:  # the time limit hit outside fit's own Ctrl-C handling
            if not timer.fired:
                raise
            error = f"time limit {args.max_seconds:g} s (outside the step loop)"
    if result is not None:
        row["steps_done"] = result.num_steps
        row["ms"] = 1e3 * result.wall_time / max(result.num_steps, 1)
        row["diverged_at"] = result.diverged_at
        row["restored_best"] = result.restored_best
        if timer.fired:
            error = f"time limit {args.max_seconds:g} s after {result.num_steps} steps"
    row["error"] = error
    end = kl_of(guide, target, args.num_draws, 20_000 + seed)
    row["kl"], row["kl_se"], row["khat"] = end["kl"], end["elbo_se"], end["khat"]
    row["within"] = bool(math.isfinite(end["kl"]) and end["kl"] <= args.tolerance)
    if "eval_error" in end:
        row["error"] = (row["error"] + "; " if row["error"] else "") + end["eval_error"]
    if args.moment_draws > 0 and math.isfinite(end["kl"]):
        pyro.set_rng_seed(30_000 + seed)
        try:
            row.update(
                flow_guides.guide_draw_errors(
                    guide, target, args.moment_draws, flow_guides.exact_moments(target)
                )
            )
        except (RuntimeError, ValueError, NotImplementedError) as failure:
            row["draws_error"] = f"{type(failure).__name__}: {str(failure)[:160]}"
    return row


def builder(name: str, target: Target) -> Callable[[], Callable]:
    """The guide ``name`` with its defaults (no STL option: ``fit``'s loss picks the estimator)."""
    return lambda: flow_guides.build_guide(name, target.model, target, "elbo")


def run_zuko(dim: int, seed: int, estimators: list[str], args: argparse.Namespace) -> list:
    command = [
        sys.executable,
        str(HERE / "zuko_peer.py"),
        "--mode",
        "fit",
        "--target",
        "rotated_gaussian",
        "--dim",
        str(dim),
        "--decades",
        str(args.decades),
        "--seed",
        str(seed),
        "--num-steps",
        str(args.num_steps),
        "--num-draws",
        str(args.num_draws),
        "--moment-draws",
        str(args.moment_draws),
        "--max-seconds",
        str(args.max_seconds),
        "--dtype",
        args.dtype,
        "--estimators",
        *estimators,
    ]
    done = subprocess.run(command, capture_output=True, text=True, cwd=HERE.parent)
    if done.returncode != 0:
        message = (done.stderr.strip().splitlines() or ["(no output)"])[-1]
        return [
            {
                "dim": dim,
                "guide": "zuko_nsf",
                "estimator": e,
                "seed": seed,
                "error": f"zuko process exited {done.returncode}: {message[:200]}",
            }
            for e in estimators
        ]
    return [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]


def config_of(args: argparse.Namespace) -> dict:
    return {
        "num_steps": args.num_steps,
        "num_draws": args.num_draws,
        "moment_draws": args.moment_draws,
        "decades": args.decades,
        "dtype": args.dtype,
        "max_seconds": args.max_seconds,
    }


def cell_path(outdir: str, dim: int, guide: str, estimator: str, seed: int) -> Path:
    return Path(outdir) / "cells" / f"d{dim}__{guide}__{estimator}__s{seed}.json"


def main(args: argparse.Namespace) -> list[dict]:
    torch.set_num_threads(1)
    torch.set_default_dtype(getattr(torch, args.dtype))
    pyro.enable_validation(False)
    unknown = [g for g in args.guides if g not in flow_guides.GUIDES]
    unknown += [e for e in args.estimators if e not in (*flow_guides.ESTIMATORS, "default")]
    if unknown:
        raise ValueError(f"unknown guides/estimators {unknown}")
    config = config_of(args)
    meta = flow_guides.run_metadata()
    if not args.report_only:
        for dim in args.dims:
            target = make_target(dim, args.decades)
            for seed in args.seeds:
                for name in args.guides:
                    todo = [
                        e
                        for e in args.estimators
                        if (e == "elbo" or name not in args.elbo_only)
                        and not (
                            args.reuse
                            and flow_guides.load_cell(
                                cell_path(args.outdir, dim, name, e, seed), config
                            )
                        )
                    ]
                    if not todo:
                        continue
                    if flow_guides.GUIDES[name].process == "zuko":
                        # zuko's guide has no default of fit's own: "default" is its "elbo"
                        rows = run_zuko(dim, seed, [e for e in todo if e != "default"], args)
                    else:
                        rows = [
                            run_cell(name, builder(name, target), target, e, seed, args)
                            for e in todo
                        ]
                    for row in rows:
                        row.update(config=config, meta=meta)
                        _save(args.outdir, row)
                        _log(row)
    rows = []
    for dim in args.dims:
        for name in args.guides:
            for e in args.estimators:
                for seed in args.seeds:
                    path = cell_path(args.outdir, dim, name, e, seed)
                    row = flow_guides.load_cell(path, config)
                    if row is not None:
                        rows.append(row)
    if rows:
        write_outputs(rows, args)
    return rows


def _save(outdir: str, row: dict) -> None:
    path = cell_path(outdir, row["dim"], row["guide"], row["estimator"], row["seed"])
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w") as f:
        json.dump(row, f, indent=1)
    os.replace(tmp, path)


def _log(row: dict) -> None:
    print(
        f"  d{row['dim']} {row['guide']:>22} {row['estimator']:>4}  "
        f"start {row.get('kl_start', math.nan):9.4f} -> {row.get('kl', math.nan):9.4f}  "
        f"{row.get('ms', math.nan):8.1f} ms  {row.get('error', '')}",
        file=sys.stderr,
        flush=True,
    )


_fmt = flow_guides._fmt


def _kl(value: object) -> str:
    if value is None:
        return "n/a"
    value = float(value)
    if math.isfinite(value) and abs(value) < 1e-3:
        return f"{value:.1e}"
    return _fmt(value, 3)


def write_outputs(rows: list[dict], args: argparse.Namespace) -> None:
    os.makedirs(args.outdir, exist_ok=True)
    columns = [
        "dim",
        "guide",
        "estimator",
        "seed",
        "init_choice",
        "kl_start",
        "kl",
        "kl_se",
        "within",
        "khat",
        "ms",
        "steps_done",
        "setup_s",
        "mean_err",
        "sd_err",
        "rs_mean_err",
        "rs_sd_err",
        "rs_khat",
        "diverged_at",
        "error",
    ]
    with open(os.path.join(args.outdir, "exact_start.csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    metas = [r["meta"] for r in rows if "meta" in r]
    loads = [m["load"][0] for m in metas]
    lines = [
        "```",
        args.command,
        "```",
        "",
        f"Cells: {len(rows)}; commit(s) {', '.join(sorted({m['commit'] for m in metas}))}; "
        f"run {min(m['date'] for m in metas)} to {max(m['date'] for m in metas)}; 1-minute "
        f"load average at the start of the parts {min(loads):.1f}-{max(loads):.1f} on "
        f"{os.cpu_count()} cores; {args.dtype}, one thread; {args.num_steps} steps of `fit`'s "
        f"defaults; KL from {args.num_draws} draws; time limit {args.max_seconds:g} s a cell.",
        "",
    ]
    for dim in args.dims:
        lines += [
            f"### {dim}-D",
            "",
            "| guide | start | KL at start | estimator | KL after ± SE | within "
            f"{args.tolerance:g} | k-hat | ms/step | steps | failure |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for row in rows:
            if row["dim"] != dim:
                continue
            within = "yes" if row.get("within") else "**no**"
            lines.append(
                f"| {row['guide']} | {row.get('init_choice') or ''} | "
                f"{_kl(row.get('kl_start'))} | {row['estimator']} | {_kl(row.get('kl'))} ± "
                f"{_fmt(row.get('kl_se'), 3)} | {within} | {_fmt(row.get('khat'))} | "
                f"{_fmt(row.get('ms'), 1)} | {row.get('steps_done', 0)} | "
                f"{row.get('error', '')} |"
            )
        lines += [""]
    lines += [
        "Errors of the draws (as in the flow benchmark: max over coordinates, in exact sd):",
        "",
        "| dim | guide | estimator | q mean | q sd | PSIS mean | PSIS sd | PSIS k-hat |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        lines.append(
            f"| {row['dim']} | {row['guide']} | {row['estimator']} | "
            f"{_fmt(row.get('mean_err'), 3)} | {_fmt(row.get('sd_err'), 3)} | "
            f"{_fmt(row.get('rs_mean_err'), 3)} | {_fmt(row.get('rs_sd_err'), 3)} | "
            f"{_fmt(row.get('rs_khat'))} |"
        )
    for dim in args.dims:
        target = make_target(dim, args.decades)
        floor = flow_guides.draw_errors(
            flow_guides.exact_draws(target, args.moment_draws, 30_000),
            flow_guides.exact_moments(target),
        )
        lines.append(
            f"| {dim} | exact draws | | {floor['mean_err']:.3f} | {floor['sd_err']:.3f} | | | |"
        )
    with open(os.path.join(args.outdir, "exact_start.md"), "w") as f:
        f.write("\n".join(lines) + "\n")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dims", type=int, nargs="+", default=[100, 200])
    parser.add_argument("--decades", type=float, default=2.0)
    parser.add_argument("--num-steps", type=int, default=1000)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--num-draws", type=int, default=2000)
    parser.add_argument("--moment-draws", type=int, default=1000)
    parser.add_argument("--tolerance", type=float, default=0.1)
    parser.add_argument("--max-seconds", type=float, default=600.0, help="per cell; 0: none")
    parser.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    parser.add_argument("--guides", nargs="+", default=DEFAULT_GUIDES)
    parser.add_argument("--estimators", nargs="+", default=list(flow_guides.ESTIMATORS))
    parser.add_argument(
        "--elbo-only", nargs="*", default=[], help="guides trained with the plain ELBO only"
    )
    parser.add_argument("--outdir", default="/tmp/exact_start")
    parser.add_argument("--reuse", action="store_true")
    parser.add_argument("--report-only", action="store_true")
    args = parser.parse_args(argv)
    args.command = "python benchmarks/exact_start.py " + " ".join(
        sys.argv[1:] if argv is None else argv
    )
    return args


if __name__ == "__main__":
    main(parse_args())
