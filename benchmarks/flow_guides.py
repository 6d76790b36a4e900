r"""Flow guides against Pyro's and zuko's guides, per training estimator: KL gap, IW-ELBO, PSIS
k-hat, the error of (PSIS-resampled) draws, and the cost of a step.

Cells are (target, guide, estimator, seed). Every cell fits the same model with the same
optimizer, the library's default for :func:`pyro_flowvi.fit`: Adam whose learning rate decays
geometrically from ``--lr`` (1e-2) to ``--final-lr`` (1e-4) over ``--num-steps``
(``pyro.optim.ClippedAdam`` with ``lrd = (final_lr / lr) ** (1 / num_steps)`` and no
clipping, built as :func:`pyro_flowvi.fit` builds it), the same ``--num-particles`` (8,
vectorized) and the same seed. Estimators (``--estimators``):

- ``elbo``: ``Trace_ELBO(8, vectorize_particles=True)``;
- ``stl``: "sticking the landing": pyro-flowvi guides with their option
  ``stick_the_landing=True`` under ``Trace_ELBO(8)``, every other guide with
  :class:`pyro_flowvi.estimators.TraceSTL_ELBO` (8 particles);
- ``iw``: :class:`pyro_flowvi.estimators.TraceIW_ELBO` with K = 8 particles (DReG gradients).

A guide that cannot run an estimator (Pyro's planar, radial, Sylvester and NAF transforms have
no inverse) fails at its first step; the failure is recorded, not worked around.

The cells of one (target, seed) are trained in **lockstep**: step 1 of every cell, then step 2,
..., the order rotated at every step, so that the load of a shared machine hits them alike.
Each cell keeps its own parameter store (``ParamStoreDict.scope``) and torch RNG stream. Speed
is the median wall time of a step (the first ``--warmup`` steps excluded), and ``ratio`` is a
cell's time over that of its counterpart (same estimator, same lockstep run): Pyro's
``AutoIAFNormal`` with the same layers and widths for IAF, ``AutoNormalizingFlow`` with the
same layers and widths for the others (see ``GUIDES``).

The zuko peer (``zuko_nsf``: ``zuko.flows.NSF`` with ``flow.transform = flow.transform.inv``,
sampled through ``pyro.contrib.zuko.ZukoToPyro`` in a hand-written guide, as Pyro's
"SVI with a Normalizing Flow guide" tutorial does) runs in its own process
(``benchmarks/zuko_peer.py``), because ``import zuko`` switches off torch's distribution
validation for the whole process. That process also trains ``spline`` in lockstep with it, so
its row's ratio (``spline`` over ``zuko_nsf``) is measured in one run too.

Quality, from fresh draws :math:`z_s \sim q` of the fitted guide with
:math:`\log w_s = \log p(z_s) - \log q(z_s)` (the targets have :math:`\log Z = 0`): KL gap =
:math:`-\overline{\log w}` with its Monte Carlo standard error, IW-ELBO = logsumexp - log S,
PSIS k-hat of ``arviz.psislw``, all from ``--num-draws`` (10,000) draws; and the error of
``--moment-draws`` draws in mean and sd against the exact moments, for the guide's own draws
and for draws PSIS-resampled from 10 times as many proposals
(:func:`pyro_flowvi.diagnostics.to_arviz` with ``resample=True``), next to the error of as many
exact draws (the Monte Carlo floor).

Results go to ``--outdir``: one JSON file per cell under ``cells/`` (a cache: ``--reuse``
keeps cells already there, so parts run separately, even in parallel processes, and
``--report-only`` assembles the report of every cached cell that matches the filters), and
``benchmark_flow_guides.{md,csv}``.

Example::

    python benchmarks/flow_guides.py --targets funnel --seeds 0 1 --outdir /tmp/fgb --reuse
    python benchmarks/flow_guides.py --targets funnel banana --seeds 0 1 --outdir /tmp/fgb \
        --report-only
"""

from __future__ import annotations

import argparse
import csv
import datetime
import functools
import json
import math
import os
import statistics
import subprocess
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pyro
import torch
from pyro import poutine
from pyro.distributions.transforms import (
    ComposeTransformModule,
    affine_coupling,
    householder,
    iterated,
    neural_autoregressive,
    permute,
    planar,
    radial,
    spline_autoregressive,
    spline_coupling,
    sylvester,
)
from pyro.infer import SVI, Trace_ELBO
from pyro.infer.autoguide import AutoIAFNormal, AutoNormal, AutoNormalizingFlow
from pyro.poutine.util import site_is_subsample

from pyro_flowvi.benchmarks.synthetic import TARGETS, Target
from pyro_flowvi.estimators import TraceIW_ELBO, TraceSTL_ELBO
from pyro_flowvi.flows import FLOWS, build_flows
from pyro_flowvi.guides import (
    AutoFlowGuide,
    AutoHouseholderGuide,
    AutoIAFGuide,
    AutoNAFGuide,
    AutoNeuralSplineGuide,
    AutoPlanarGuide,
    AutoRadialGuide,
    AutoRealNVPGuide,
    AutoSylvesterGuide,
)

HERE = Path(__file__).resolve().parent
ESTIMATORS = ("elbo", "stl", "iw")
# By Markov's inequality P(IW-ELBO > log Z + t) <= exp(-t) for a correct guide.
IW_MARGIN = math.log(1000.0)

# ----------------------------------------------------------------------------------------------
# guides: ours with their registry defaults, the peers with the same layers and widths

NUM_PLANAR = FLOWS["planar"].defaults["num_transforms"]
NUM_RADIAL = FLOWS["radial"].defaults["num_transforms"]
NUM_SYLVESTER = FLOWS["sylvester-householder"].defaults["num_transforms"]
NUM_IAF = FLOWS["iaf"].defaults["num_transforms"]
NUM_SPLINE = FLOWS["spline-autoregressive"].defaults["num_transforms"]
NUM_SPLINE_COUPLING = FLOWS["spline-coupling"].defaults["num_transforms"]
NUM_REALNVP = FLOWS["realnvp"].defaults["num_transforms"]
NUM_NAF = FLOWS["naf"].defaults["num_transforms"]
SPLINE_BINS = FLOWS["spline-autoregressive"].defaults["bins"]
SPLINE_BOUND = FLOWS["spline-autoregressive"].defaults["bound"]
NAF_UNITS = FLOWS["naf"].defaults["hidden_units"]


def num_reflections(dim: int) -> int:
    """AutoHouseholderGuide's default number of reflections."""
    return build_flows("householder", dim)[-1].num_reflections


def num_sylvester_reflections(dim: int) -> int:
    """Reflections per Q of our Householder-variant Sylvester layer (its default)."""
    return build_flows("sylvester-householder", dim, num_transforms=1)[0].num_householder


def hidden_widths(family: str, dim: int) -> list[int]:
    """Hidden widths of the conditioner of one layer of ``family``'s default stack."""
    layer = build_flows(family, dim, num_transforms=1)[0]
    made = getattr(layer, "made", None)
    if made is not None:
        return list(made.hidden_dims)
    linears = [m for m in layer.net if isinstance(m, torch.nn.Linear)]
    return [m.out_features for m in linears[:-1]]


def _flip(dim: int) -> torch.nn.Module:
    return permute(dim, torch.arange(dim - 1, -1, -1))


def _coupling_stack(make: Callable[[int], torch.nn.Module], count: int, dim: int):
    """``count`` coupling layers with a reversal between them (as our alternating masks)."""
    layers = []
    for i in range(count):
        if i:
            layers.append(_flip(dim))
        layers.append(make(dim))
    return ComposeTransformModule(layers)


def pyro_nsf(dim: int) -> torch.nn.Module:
    """Pyro's spline IAF stack at our spline guide's size (layers, widths, bins, bound).

    Pyro's ``spline_autoregressive`` helper builds only its default ``order="linear"``
    (rational-linear splines, Dolatabadi et al. 2020): with ``order="quadratic"`` its
    parameter count does not match and the first step fails.
    """
    widths = hidden_widths("spline-autoregressive", dim)
    return iterated(
        NUM_SPLINE,
        spline_autoregressive,
        dim,
        hidden_dims=widths,
        count_bins=SPLINE_BINS,
        bound=SPLINE_BOUND,
    )


def pyro_spline_coupling(dim: int) -> torch.nn.Module:
    widths = hidden_widths("spline-coupling", dim)
    make = functools.partial(
        spline_coupling, hidden_dims=widths, count_bins=SPLINE_BINS, bound=SPLINE_BOUND
    )
    return _coupling_stack(make, NUM_SPLINE_COUPLING, dim)


def pyro_realnvp(dim: int) -> torch.nn.Module:
    widths = hidden_widths("realnvp", dim)
    return _coupling_stack(
        functools.partial(affine_coupling, hidden_dims=widths), NUM_REALNVP, dim
    )


def pyro_naf(dim: int) -> torch.nn.Module:
    widths = hidden_widths("naf", dim)
    return iterated(NUM_NAF, neural_autoregressive, dim, hidden_dims=widths, width=NAF_UNITS)


def _pyro_householder(dim: int) -> torch.nn.Module:
    return householder(dim, count_transforms=num_reflections(dim))


def _pyro_sylvester_stack(dim: int) -> torch.nn.Module:
    return iterated(NUM_SYLVESTER, sylvester, dim, count_transforms=num_sylvester_reflections(dim))


def _pyro_iaf(model, target: Target) -> AutoIAFNormal:
    widths = hidden_widths("iaf", target.dim)
    return AutoIAFNormal(model, hidden_dim=widths, num_transforms=NUM_IAF)


@dataclass(frozen=True)
class GuideSpec:
    """How to build one benchmarked guide.

    Attributes:
        build: ``build(model, target, **options) -> guide``; pyro-flowvi guides take
            ``stick_the_landing``.
        counterpart: the peer with the same layers and widths (for the time ratio), or None.
        description: one line for the report.
        ours: whether it is a pyro-flowvi guide (then ``stl`` uses the guide's option).
        process: ``"main"`` or ``"zuko"`` (trained by ``benchmarks/zuko_peer.py``).
    """

    build: Callable
    counterpart: str | None
    description: str
    ours: bool = False
    process: str = "main"


def _ours(cls: type, **options: object) -> Callable:
    return lambda m, t, **kw: cls(m, **options, **kw)


def _nf(make: Callable[[int], torch.nn.Module]) -> Callable:
    return lambda m, t: AutoNormalizingFlow(m, make)


# The banana's spline configuration (docs/benchmark_flow_guides.md, "The banana target").
SPLINE_GELU_OPTIONS = {"hidden_dims": [64, 64], "activation": torch.nn.GELU, "bound": 8.0}

GUIDES: dict[str, GuideSpec] = {
    "planar": GuideSpec(_ours(AutoPlanarGuide), "pyro_planar", "AutoPlanarGuide (8 layers)", True),
    "radial": GuideSpec(_ours(AutoRadialGuide), "pyro_radial", "AutoRadialGuide (8 layers)", True),
    "householder": GuideSpec(
        _ours(AutoHouseholderGuide),
        "pyro_householder",
        "AutoHouseholderGuide (diag + min(D,16) reflections)",
        True,
    ),
    "sylvester_orthogonal": GuideSpec(
        _ours(AutoSylvesterGuide, variant="orthogonal"),
        "pyro_sylvester",
        "AutoSylvesterGuide orthogonal (4 layers)",
        True,
    ),
    "sylvester_householder": GuideSpec(
        _ours(AutoSylvesterGuide, variant="householder"),
        "pyro_sylvester",
        "AutoSylvesterGuide householder (4 layers, min(D,8) reflections)",
        True,
    ),
    "sylvester_triangular": GuideSpec(
        _ours(AutoSylvesterGuide, variant="triangular"),
        "pyro_sylvester",
        "AutoSylvesterGuide triangular (4 layers)",
        True,
    ),
    "iaf": GuideSpec(_ours(AutoIAFGuide), "pyro_iaf", "AutoIAFGuide (3 gated IAF, [2D,2D])", True),
    "iaf_affine": GuideSpec(
        _ours(AutoIAFGuide, update="affine"),
        "pyro_iaf",
        "AutoIAFGuide(update='affine') (3 affine IAF, [2D,2D]; not in the default run)",
        True,
    ),
    "spline": GuideSpec(
        _ours(AutoNeuralSplineGuide),
        "pyro_nsf",
        "AutoNeuralSplineGuide (3 autoregressive RQ splines, 8 bins, bound 5, [2D,2D])",
        True,
    ),
    "spline_coupling": GuideSpec(
        _ours(AutoNeuralSplineGuide, coupling=True),
        "pyro_spline_coupling",
        "AutoNeuralSplineGuide(coupling=True) (4 RQ spline couplings, 8 bins, [2D,2D])",
        True,
    ),
    "realnvp": GuideSpec(
        _ours(AutoRealNVPGuide), "pyro_realnvp", "AutoRealNVPGuide (4 affine couplings)", True
    ),
    "naf": GuideSpec(
        _ours(AutoNAFGuide), "pyro_naf", "AutoNAFGuide (3 NAF layers, 8 sigmoids, [2D,2D])", True
    ),
    "spline_gelu": GuideSpec(
        _ours(AutoFlowGuide, flows="spline-autoregressive", flow_options=SPLINE_GELU_OPTIONS),
        "pyro_nsf",
        "AutoFlowGuide('spline-autoregressive', flow_options={'hidden_dims': [64, 64], "
        "'activation': nn.GELU, 'bound': 8.0}) (3 autoregressive RQ splines, 8 bins; not in "
        "the default run)",
        True,
    ),
    "spline_gelu_b10": GuideSpec(
        _ours(
            AutoFlowGuide,
            flows="spline-autoregressive",
            flow_options={**SPLINE_GELU_OPTIONS, "bound": 10.0},
        ),
        "pyro_nsf",
        "spline_gelu with bound 10 (not in the default run)",
        True,
    ),
    "iaf_t": GuideSpec(
        _ours(AutoIAFGuide, base="studentt"),
        "pyro_iaf",
        "AutoIAFGuide(base='studentt') (not in the default run)",
        True,
    ),
    # peers
    "normal": GuideSpec(lambda m, t: AutoNormal(m), None, "AutoNormal"),
    "pyro_iaf": GuideSpec(_pyro_iaf, None, "AutoIAFNormal(hidden_dim=[2D,2D], num_transforms=3)"),
    "pyro_iaf_default": GuideSpec(
        lambda m, t: AutoIAFNormal(m), None, "AutoIAFNormal() defaults (1 layer, [3D+1])"
    ),
    "pyro_nsf": GuideSpec(
        _nf(pyro_nsf),
        None,
        "AutoNormalizingFlow, 3 x spline_autoregressive(hidden_dims=[2D,2D], count_bins=8, "
        "bound=5) (rational-linear)",
    ),
    "pyro_nsf_default": GuideSpec(
        _nf(functools.partial(iterated, NUM_SPLINE, spline_autoregressive)),
        None,
        "AutoNormalizingFlow, 3 x spline_autoregressive() defaults ([10D,10D], 8 bins, bound 3)",
    ),
    "zuko_nsf": GuideSpec(
        None,
        None,
        "zuko.flows.NSF(D, transforms=3, hidden_features=[2D,2D]) with transform.inv, through "
        "ZukoToPyro as in Pyro's tutorial (own process)",
        process="zuko",
    ),
    "pyro_spline_coupling": GuideSpec(
        _nf(pyro_spline_coupling),
        None,
        "AutoNormalizingFlow, 4 x spline_coupling([2D,2D], 8 bins, bound 5) with reversals",
    ),
    "pyro_realnvp": GuideSpec(
        _nf(pyro_realnvp), None, "AutoNormalizingFlow, 4 x affine_coupling([2D,2D]) with reversals"
    ),
    "pyro_naf": GuideSpec(
        _nf(pyro_naf), None, "AutoNormalizingFlow, 3 x neural_autoregressive([2D,2D], width=8)"
    ),
    "pyro_planar": GuideSpec(
        _nf(functools.partial(iterated, NUM_PLANAR, planar)),
        None,
        "AutoNormalizingFlow, 8 x planar",
    ),
    "pyro_radial": GuideSpec(
        _nf(functools.partial(iterated, NUM_RADIAL, radial)),
        None,
        "AutoNormalizingFlow, 8 x radial",
    ),
    "pyro_householder": GuideSpec(
        _nf(_pyro_householder),
        None,
        "AutoNormalizingFlow, householder(count_transforms=min(D,16))",
    ),
    "pyro_sylvester": GuideSpec(
        _nf(_pyro_sylvester_stack),
        None,
        "AutoNormalizingFlow, 4 x sylvester(count_transforms=min(D,8))",
    ),
}
# Run only when named with --guides.
OPTIONAL = ["iaf_t", "iaf_affine", "spline_gelu", "spline_gelu_b10", "pyro_nsf_default"]
OURS = [name for name, spec in GUIDES.items() if spec.ours]
# The peers the quality comparison is made against (the equal-capacity Pyro stacks of the other
# families are there for the time ratios).
MAIN_PEERS = ["normal", "pyro_iaf", "pyro_iaf_default", "pyro_nsf", "pyro_nsf_default", "zuko_nsf"]
EQUAL_CAPACITY = [
    name for name in GUIDES if name.startswith("pyro_") and name not in MAIN_PEERS + OPTIONAL
]
# Trained with the plain ELBO only unless --elbo-only says otherwise: the Sylvester variants
# other than the default (their STL/IW steps cost ~20x a plain one through a sequential
# inverse), Pyro's spline stack (its inverse is sequential too) and the Pyro stacks whose
# transforms have no inverse.
ELBO_ONLY = [
    "sylvester_householder",
    "sylvester_triangular",
    "pyro_nsf",
    "pyro_nsf_default",
    "pyro_planar",
    "pyro_radial",
    "pyro_sylvester",
    "pyro_naf",
]


def build_guide(name: str, model: Callable, target: Target, estimator: str) -> object:
    """The guide ``name`` for ``model``; pyro-flowvi guides get ``stick_the_landing`` for STL."""
    spec = GUIDES[name]
    if spec.ours:
        return spec.build(model, target, stick_the_landing=estimator == "stl")
    return spec.build(model, target)


def make_loss(estimator: str, ours: bool, num_particles: int) -> pyro.infer.ELBO:
    """The ELBO object of an estimator (see the module docstring)."""
    vectorize = num_particles > 1
    if estimator == "elbo" or (estimator == "stl" and ours):
        return Trace_ELBO(num_particles=num_particles, vectorize_particles=vectorize)
    if estimator == "stl":
        return TraceSTL_ELBO(num_particles, vectorize_particles=vectorize)
    if estimator == "iw":
        return TraceIW_ELBO(num_particles, vectorize_particles=vectorize)
    raise ValueError(f"unknown estimator {estimator!r}; valid: {list(ESTIMATORS)}")


def default_optim(
    num_steps: int, lr: float = 1e-2, final_lr: float = 1e-4
) -> pyro.optim.PyroOptim:
    """:func:`pyro_flowvi.fit`'s default optimizer: Adam decaying from ``lr`` to ``final_lr``."""
    decay = (final_lr / lr) ** (1.0 / max(num_steps, 1))
    return pyro.optim.ClippedAdam({"lr": lr, "lrd": decay, "clip_norm": math.inf})


# ----------------------------------------------------------------------------------------------
# log importance weights of any guide


class _NotVectorizable(Exception):
    pass


def _max_plate_nesting(model, guide, args: tuple) -> int:
    nesting = 0
    for fn in (guide, model):
        trace = poutine.trace(fn).get_trace(*args)
        for site in trace.nodes.values():
            if site["type"] == "sample":
                for frame in site["cond_indep_stack"]:
                    if frame.vectorized and frame.dim is not None:
                        nesting = max(nesting, -frame.dim)
    return nesting


def _per_draw(trace, num: int, nesting: int) -> torch.Tensor:
    """Sum every sample site's log-density to one number per draw (draws at dim -nesting-1)."""
    trace.compute_log_prob()
    total = torch.zeros(num)
    for site in trace.nodes.values():
        if site["type"] != "sample":
            continue
        log_prob = site["log_prob"]
        if log_prob.dim() > nesting + 1:
            raise _NotVectorizable(
                f"site {site['name']!r} has log_prob shape {tuple(log_prob.shape)} under "
                f"{nesting} model plates and a draw plate"
            )
        if log_prob.dim() <= nesting:  # does not depend on the draw
            total = total + log_prob.sum()
            continue
        if log_prob.shape[0] not in (1, num):
            raise _NotVectorizable(f"site {site['name']!r}: bad draw dim {log_prob.shape}")
        total = total + log_prob.reshape(log_prob.shape[0], -1).sum(-1).to(total.dtype)
    return total


def model_log_joint(model, args: tuple, values: dict[str, torch.Tensor]) -> torch.Tensor:
    """``log p(values, data)`` of one draw: every sample site, observed ones included."""
    trace = poutine.trace(poutine.condition(model, data=values)).get_trace(*args)
    return trace.log_prob_sum()


def latent_shapes(model, args: tuple) -> dict[str, torch.Size]:
    """The model's latent sample sites and their shapes (one prior trace)."""
    prototype = poutine.trace(model).get_trace(*args)
    return {
        name: site["value"].shape
        for name, site in prototype.nodes.items()
        if site["type"] == "sample" and not site["is_observed"] and not site_is_subsample(site)
    }


def _per_draw_values(guide_trace, shapes: dict[str, torch.Size], num: int) -> dict:
    """The guide's values of the model's latent sites, reshaped to ``(num,) + site shape``."""
    values = {}
    for name, shape in shapes.items():
        value = guide_trace.nodes[name]["value"]
        size = math.prod(shape)
        if value.dim() == len(shape):  # the same value for every draw
            value = value.unsqueeze(0)
        if value.shape[0] not in (1, num) or value[0].numel() != size:
            raise _NotVectorizable(f"site {name!r}: value of shape {tuple(value.shape)}")
        values[name] = value.reshape(value.shape[0], *shape).expand(num, *shape)
    return values


def _guide_draws(model, guide, args: tuple, num: int, nesting: int) -> torch.Tensor:
    """Draw ``num`` times from the guide in a plate; return ``log p - log q`` per draw.

    The model is scored with ``torch.func.vmap`` over the draws, so it sees one draw at a time
    whatever it assumes about batch shapes; the first two draws are checked against a plain
    (unbatched) evaluation.
    """
    shapes = latent_shapes(model, args)
    with pyro.plate("_benchmark_draws", num, dim=-nesting - 1):
        guide_trace = poutine.trace(guide).get_trace(*args)
    log_q = _per_draw(guide_trace, num, nesting)
    values = _per_draw_values(guide_trace, shapes, num)
    log_p = torch.func.vmap(functools.partial(model_log_joint, model, args))(values)
    for i in range(min(num, 2)):
        check = model_log_joint(model, args, {k: v[i] for k, v in values.items()})
        if not torch.allclose(check, log_p[i], rtol=1e-4, atol=1e-3):
            raise _NotVectorizable(f"vmap gives {float(log_p[i])}, a plain run {float(check)}")
    return log_p - log_q


@torch.no_grad()
def log_weights(
    model, guide, args: tuple, num_draws: int, loop_draws: int | None = None, chunk: int = 1000
) -> torch.Tensor:
    r""":math:`\log p(z_s, x) - \log q(z_s)` for ``num_draws`` fresh draws of ``guide``.

    The guide runs inside a vectorized plate placed below the model's plates (every guide
    site counts, auxiliary latent sites included) and the model is scored on each draw through
    ``torch.func.vmap`` (every model site counts, observed ones included). When either step
    fails, each draw is traced one at a time, with ``loop_draws`` draws (default
    ``num_draws``).
    """
    nesting = _max_plate_nesting(model, guide, args)
    try:
        parts = []
        for start in range(0, num_draws, chunk):
            num = min(chunk, num_draws - start)
            parts.append(_guide_draws(model, guide, args, num, nesting))
        return torch.cat(parts)
    except (_NotVectorizable, RuntimeError, ValueError) as error:
        print(f"    scoring one draw at a time ({error})", file=sys.stderr, flush=True)
    values = []
    for _ in range(num_draws if loop_draws is None else min(num_draws, loop_draws)):
        guide_trace = poutine.trace(guide).get_trace(*args)
        model_trace = poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(*args)
        values.append(float(model_trace.log_prob_sum() - guide_trace.log_prob_sum()))
    return torch.tensor(values)


def summarize(log_w: torch.Tensor) -> dict:
    """KL gap (log Z = 0) with its standard error, ELBO, IW-ELBO and PSIS k-hat of log weights."""
    import arviz as az
    import numpy as np

    log_w = log_w.double()
    finite = torch.isfinite(log_w)
    num = log_w.numel()
    row = {"num_draws": num, "num_nonfinite": int((~finite).sum())}
    if not bool(finite.all()) or num < 2:
        row.update(elbo=-math.inf, elbo_se=math.nan, iw_elbo=math.nan, khat=math.inf)
    else:
        row["elbo"] = float(log_w.mean())
        row["elbo_se"] = float(log_w.std() / math.sqrt(num))
        row["iw_elbo"] = float(torch.logsumexp(log_w, 0) - math.log(num))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            _, khat = az.psislw(np.asarray(log_w), normalize=True)
        row["khat"] = float(khat)
    return row


# ----------------------------------------------------------------------------------------------
# errors of draws in mean and sd


def exact_moments(target: Target) -> dict[str, list[float]] | None:
    """Mean and sd of every latent coordinate of a synthetic target (flattened, site order).

    Funnel: v ~ N(0, 3^2), x_i | v ~ N(0, e^v), so sd(x_i) = e^{9/4}. Banana: a ~ N(0, 2^2),
    b | a ~ N((a^2 - 4) / 4, 1), so E b = 0 and var b = 1 + var(a^2) / 16 = 3. Rotated
    Gaussian: the diagonal of its covariance. ``None`` for other targets.
    """
    if target.name == "funnel":
        sd = [3.0] + [math.exp(9.0 / 4.0)] * (target.dim - 1)
        return {"mean": [0.0] * target.dim, "sd": sd}
    if target.name == "banana":
        half = target.dim // 2
        return {"mean": [0.0] * target.dim, "sd": [2.0] * half + [math.sqrt(3.0)] * half}
    if target.name == "rotated_gaussian":
        site = poutine.trace(target.model).get_trace().nodes["x"]
        variance = site["fn"].covariance_matrix.diagonal().double()
        return {"mean": [0.0] * target.dim, "sd": variance.sqrt().tolist()}
    return None


def draw_errors(draws, moments: dict[str, list[float]]) -> dict[str, float]:
    """Max over coordinates of |mean - true mean| / true sd and of |sd / true sd - 1|."""
    import numpy as np

    draws = np.asarray(draws, dtype=np.float64)
    mean, sd = np.asarray(moments["mean"]), np.asarray(moments["sd"])
    return {
        "mean_err": float(np.max(np.abs(draws.mean(0) - mean) / sd)),
        "sd_err": float(np.max(np.abs(draws.std(0, ddof=1) / sd - 1.0))),
    }


def exact_draws(target: Target, num: int, seed: int):
    """``num`` exact draws of a generative target (no observed sites), flattened."""
    from pyro_flowvi.diagnostics import flatten_draws

    pyro.set_rng_seed(seed)
    # the synthetic targets have no plates of their own
    with torch.no_grad(), pyro.plate("_exact", num, dim=-1):
        trace = poutine.trace(target.model).get_trace(*target.args)
    shapes = latent_shapes(target.model, target.args)
    values = {
        name: trace.nodes[name]["value"].reshape(1, num, *shape).double().numpy()
        for name, shape in shapes.items()
    }
    return flatten_draws(values, list(shapes))[0]


def guide_draw_errors(guide, target: Target, num: int, moments: dict) -> dict[str, float]:
    """Errors of ``num`` draws of the guide and of ``num`` PSIS-resampled draws (10x proposals).

    Returns ``mean_err``/``sd_err`` (the guide's own draws), ``rs_mean_err``/``rs_sd_err``
    (resampled) and ``rs_khat`` (k-hat of the proposals).
    """
    from pyro_flowvi.diagnostics import flatten_draws, to_arviz

    shapes = latent_shapes(target.model, target.args)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        plain = to_arviz(guide, target.model, *target.args, num_draws=num)
        resampled = to_arviz(guide, target.model, *target.args, num_draws=num, resample=True)
    result = {}
    for prefix, idata in (("", plain), ("rs_", resampled)):
        values = {name: idata.posterior[name].values for name in shapes}
        errors = draw_errors(flatten_draws(values, list(shapes))[0], moments)
        result.update({prefix + key: value for key, value in errors.items()})
    result["rs_khat"] = float(resampled.posterior.attrs["psis_khat"])
    return result


# ----------------------------------------------------------------------------------------------
# lockstep training


@dataclass
class Run:
    """One cell in training: a guide, its SVI, its parameter store and RNG stream."""

    guide_name: str
    estimator: str
    guide: object
    svi: SVI
    state: dict
    rng: torch.Tensor
    times: list = field(default_factory=list)
    losses: list = field(default_factory=list)
    error: str | None = None
    setup_s: float = math.nan

    @property
    def key(self) -> tuple[str, str]:
        return (self.guide_name, self.estimator)


def start_run(
    name: str,
    estimator: str,
    target: Target,
    seed: int,
    num_steps: int,
    lr: float,
    final_lr: float,
    num_particles: int,
    builder: Callable | None = None,
) -> Run:
    """Build a cell's guide (and run it once, so that its start is made) in its own scope."""
    store = pyro.get_param_store()
    pyro.set_rng_seed(seed)
    spec = GUIDES.get(name)
    ours = spec.ours if spec is not None else False
    with store.scope() as state:
        guide = (
            builder()
            if builder is not None
            else build_guide(name, target.model, target, estimator)
        )
        loss = make_loss(estimator, ours, num_particles)
        svi = SVI(target.model, guide, default_optim(num_steps, lr, final_lr), loss)
        run = Run(name, estimator, guide, svi, state, torch.get_rng_state())
        begin = time.perf_counter()
        try:
            guide(*target.args)  # builds lazy guides (our start runs here)
        except (RuntimeError, ValueError, NotImplementedError) as error:
            run.error = f"setup: {type(error).__name__}: {str(error)[:160]}"
        run.setup_s = time.perf_counter() - begin
    pyro.set_rng_seed(seed)
    run.rng = torch.get_rng_state()
    return run


def train_lockstep(runs: list[Run], target: Target, num_steps: int) -> None:
    """One step of every run in rotating order, ``num_steps`` times; failures are recorded."""
    store = pyro.get_param_store()
    for step in range(num_steps):
        shift = step % len(runs)
        for run in runs[shift:] + runs[:shift]:
            if run.error is not None:
                continue
            torch.set_rng_state(run.rng)
            with store.scope(run.state):
                try:
                    begin = time.perf_counter()
                    loss = run.svi.step(*target.args)
                    run.times.append(time.perf_counter() - begin)
                except (RuntimeError, ValueError, NotImplementedError) as error:
                    run.error = f"step {step}: {type(error).__name__}: {str(error)[:160]}"
                    continue
            run.rng = torch.get_rng_state()
            run.losses.append(loss)
            if not math.isfinite(loss):
                run.error = f"step {step}: loss {loss}"


def evaluate_run(run: Run, target: Target, seed: int, args: argparse.Namespace) -> dict:
    """Quality figures of a trained cell (see the module docstring)."""
    store = pyro.get_param_store()
    if run.error is not None:
        row = summarize(torch.tensor([-math.inf]))
        row["num_draws"] = 0
        return row
    with store.scope(run.state):
        pyro.set_rng_seed(10_000 + seed)
        try:
            row = summarize(
                log_weights(target.model, run.guide, target.args, args.num_draws, args.loop_draws)
            )
        except (RuntimeError, ValueError, NotImplementedError) as error:
            run.error = f"evaluation: {type(error).__name__}: {str(error)[:160]}"
            return summarize(torch.tensor([-math.inf]))
        moments = exact_moments(target)
        if moments is not None and args.moment_draws > 0 and math.isfinite(row["elbo"]):
            pyro.set_rng_seed(20_000 + seed)
            try:
                row.update(guide_draw_errors(run.guide, target, args.moment_draws, moments))
            except (RuntimeError, ValueError, NotImplementedError) as error:
                row["draws_error"] = f"{type(error).__name__}: {str(error)[:160]}"
    return row


def timing(run: Run, warmup: int) -> float:
    times = run.times[warmup:] or run.times
    return 1e3 * statistics.median(times) if times else math.nan


# ----------------------------------------------------------------------------------------------
# cells: cache, rows


def config_of(args: argparse.Namespace) -> dict:
    """What a cached cell must match to be reused."""
    return {
        "num_steps": args.num_steps,
        "num_particles": args.num_particles,
        "lr": args.lr,
        "final_lr": args.final_lr,
        "dtype": args.dtype,
        "num_draws": args.num_draws,
        "moment_draws": args.moment_draws,
    }


def cell_path(outdir: str, target: str, guide: str, estimator: str, seed: int) -> Path:
    return Path(outdir) / "cells" / f"{target}__{guide}__{estimator}__s{seed}.json"


def load_cell(path: Path, config: dict) -> dict | None:
    if not path.exists():
        return None
    with open(path) as f:
        row = json.load(f)
    return row if row.get("config") == config else None


def save_cell(outdir: str, row: dict) -> None:
    path = cell_path(outdir, row["target"], row["guide"], row["estimator"], row["seed"])
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w") as f:
        json.dump(row, f, indent=1)
    os.replace(tmp, path)


def run_metadata() -> dict:
    """Commit, date and machine load, for the report."""
    try:
        commit = subprocess.run(
            ["git", "-C", str(HERE), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(HERE), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        commit += "+dirty" if dirty else ""
    except (OSError, subprocess.CalledProcessError):
        commit = "unknown"
    return {
        "commit": commit,
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "load": list(os.getloadavg()),
        "torch": torch.__version__,
        "pyro": pyro.__version__,
    }


def rows_of_runs(
    runs: list[Run], target: Target, seed: int, args: argparse.Namespace, run_id: str
) -> list[dict]:
    """Evaluate the trained runs of one lockstep run and make their rows."""
    medians = {run.key: timing(run, args.warmup) for run in runs}
    rows = []
    for run in runs:
        row = {
            "target": target.name,
            "guide": run.guide_name,
            "estimator": run.estimator,
            "seed": seed,
            "run_id": run_id,
        }
        row.update(evaluate_run(run, target, seed, args))
        row["kl_gap"] = (target.log_z or 0.0) - row["elbo"]
        row["ms"] = medians[run.key]
        row["setup_s"] = run.setup_s
        row["steps_done"] = len(run.losses)
        row["final_loss"] = statistics.mean(run.losses[-100:]) if run.losses else math.nan
        row["error"] = run.error or ""
        spec = GUIDES.get(run.guide_name)
        partner = spec.counterpart if spec else None
        row["counterpart"] = partner
        key = (partner, run.estimator)
        row["ratio"] = medians[run.key] / medians[key] if key in medians else math.nan
        rows.append(row)
    return rows


# ----------------------------------------------------------------------------------------------
# the zuko peer, in its own process


def run_zuko(target_name: str, seed: int, estimators: list[str], args: argparse.Namespace) -> list:
    """Train ``zuko_nsf`` (and ``spline`` beside it, for the time ratio) in a subprocess."""
    command = [
        sys.executable,
        str(HERE / "zuko_peer.py"),
        "--mode",
        "lockstep",
        "--target",
        target_name,
        "--seed",
        str(seed),
        "--num-steps",
        str(args.num_steps),
        "--num-particles",
        str(args.num_particles),
        "--lr",
        str(args.lr),
        "--final-lr",
        str(args.final_lr),
        "--dtype",
        args.dtype,
        "--num-draws",
        str(args.num_draws),
        "--moment-draws",
        str(args.moment_draws),
        "--warmup",
        str(args.warmup),
        "--estimators",
        *estimators,
        "--partner-estimators",
        *args.zuko_partner_estimators,
    ]
    done = subprocess.run(command, capture_output=True, text=True, cwd=HERE.parent)
    if done.returncode != 0:
        message = done.stderr.strip().splitlines()[-1:] or ["(no output)"]
        return [
            {
                "target": target_name,
                "guide": "zuko_nsf",
                "estimator": estimator,
                "seed": seed,
                "error": f"zuko process exited {done.returncode}: {message[0][:200]}",
            }
            for estimator in estimators
        ]
    return [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]


# ----------------------------------------------------------------------------------------------


def main(args: argparse.Namespace) -> list[dict]:
    torch.set_num_threads(1)
    torch.set_default_dtype(getattr(torch, args.dtype))
    pyro.enable_validation(False)  # as in a production SVI loop; validation costs per step
    unknown = [g for g in args.guides if g not in GUIDES] + [
        t for t in args.targets if t not in TARGETS
    ]
    unknown += [e for e in args.estimators if e not in ESTIMATORS]
    unknown += [t for t in args.targets if t in TARGETS and TARGETS[t]().log_z is None]
    if unknown:
        raise ValueError(
            f"unknown guides/targets/estimators {unknown}; guides: {list(GUIDES)}, targets "
            "with a known log Z: funnel, banana, rotated_gaussian; estimators: "
            f"{list(ESTIMATORS)}"
        )
    config = config_of(args)
    meta = run_metadata()
    started = time.perf_counter()
    if not args.report_only:
        for target_name in args.targets:
            target = TARGETS[target_name]()
            for seed in args.seeds:
                train_cells(target, seed, args, config, meta)
    rows = []
    for t in args.targets:
        for g in args.guides:
            for e in args.estimators:
                for s in args.seeds:
                    row = load_cell(cell_path(args.outdir, t, g, e, s), config)
                    if row is not None:
                        rows.append(row)
    if rows:
        write_outputs(rows, args, meta, time.perf_counter() - started)
    return rows


def train_cells(
    target: Target, seed: int, args: argparse.Namespace, config: dict, meta: dict
) -> None:
    """Train (in lockstep) and save every cell of (target, seed) not already cached."""
    todo = [
        (g, e)
        for g in args.guides
        for e in args.estimators
        if (e == "elbo" or g not in args.elbo_only)
        and not (
            args.reuse
            and load_cell(cell_path(args.outdir, target.name, g, e, seed), config) is not None
        )
    ]
    main_cells = [(g, e) for g, e in todo if GUIDES[g].process == "main"]
    zuko_estimators = [e for g, e in todo if GUIDES[g].process == "zuko"]
    run_id = f"{target.name}-s{seed}-{meta['date']}"
    begin = time.perf_counter()
    if main_cells:
        runs = [
            start_run(
                g, e, target, seed, args.num_steps, args.lr, args.final_lr, args.num_particles
            )
            for g, e in main_cells
        ]
        train_lockstep(runs, target, args.num_steps)
        fitted = time.perf_counter() - begin
        rows = rows_of_runs(runs, target, seed, args, run_id)
        for row in rows:
            row.update(config=config, meta=meta)
            save_cell(args.outdir, row)
            _log(row)
        print(
            f"{target.name} seed {seed}: {len(runs)} cells fitted in {fitted:.0f} s, evaluated "
            f"in {time.perf_counter() - begin - fitted:.0f} s",
            file=sys.stderr,
            flush=True,
        )
    if zuko_estimators:
        for row in run_zuko(target.name, seed, zuko_estimators, args):
            if row["guide"] != "zuko_nsf":
                continue  # the spline runs beside it only give the time ratio
            row.setdefault("run_id", f"{run_id}-zuko")
            row.update(config=config, meta=meta)
            save_cell(args.outdir, row)
            _log(row)


def _log(row: dict) -> None:
    print(
        f"  {row['target']:>8} s{row['seed']} {row['guide']:>22} {row['estimator']:>4}  "
        f"KL {row.get('kl_gap', math.nan):8.3f} ± {row.get('elbo_se', math.nan):.3f}  "
        f"khat {row.get('khat', math.nan):5.2f}  {row.get('ms', math.nan):7.2f} ms  "
        f"ratio {row.get('ratio', math.nan):.2f} {row.get('error', '')}",
        file=sys.stderr,
        flush=True,
    )


# ----------------------------------------------------------------------------------------------
# report


def _fmt(value: object, digits: int = 2) -> str:
    if value is None or value == "":
        return "n/a"
    value = float(value)
    if math.isnan(value):
        return "n/a"
    if math.isinf(value):
        return "-inf" if value < 0 else "inf"
    return f"{value:.{digits}f}"


def _mean(values: list[float]) -> float:
    values = [float(v) for v in values if v is not None and v != ""]
    return sum(values) / len(values) if values else math.nan


def aggregate(rows: list[dict]) -> dict[tuple[str, str, str], dict]:
    """Per (target, guide, estimator): means over seeds (medians for times), per-seed lists."""
    groups: dict[tuple[str, str, str], list[dict]] = {}
    for row in rows:
        groups.setdefault((row["target"], row["guide"], row["estimator"]), []).append(row)
    result = {}
    for key, group in groups.items():
        group = sorted(group, key=lambda r: r["seed"])
        k = len(group)
        agg = {
            "seeds": [r["seed"] for r in group],
            "errors": "; ".join(f"s{r['seed']}: {r['error']}" for r in group if r.get("error")),
            "kl_seeds": [r.get("kl_gap", math.inf) for r in group],
            "khat_seeds": [r.get("khat", math.inf) for r in group],
        }
        for col in (
            "kl_gap",
            "elbo",
            "iw_elbo",
            "khat",
            "mean_err",
            "sd_err",
            "rs_mean_err",
            "rs_sd_err",
            "rs_khat",
        ):
            agg[col] = _mean([r.get(col, math.nan) for r in group])
        ses = [r.get("elbo_se", math.nan) for r in group]
        agg["elbo_se"] = math.sqrt(sum(float(s) ** 2 for s in ses)) / k
        times = [r["ms"] for r in group if r.get("ms") is not None and math.isfinite(r["ms"])]
        agg["ms"] = statistics.median(times) if times else math.nan
        ratios = [r["ratio"] for r in group if r.get("ratio") is not None]
        ratios = [x for x in ratios if math.isfinite(x)]
        agg["ratio"] = statistics.median(ratios) if ratios else math.nan
        agg["counterpart"] = group[0].get("counterpart")
        agg["steps_done"] = min(r.get("steps_done", 0) for r in group)
        result[key] = agg
    return result


def _seeds(values: list[float], digits: int = 2) -> str:
    return ", ".join(_fmt(v, digits) for v in values)


def report_lines(rows: list[dict], args: argparse.Namespace, meta: dict) -> list[str]:
    agg = aggregate(rows)
    targets = [t for t in args.targets if any(r["target"] == t for r in rows)]
    guides = [g for g in args.guides if any(r["guide"] == g for r in rows)]
    estimators = [e for e in args.estimators if any(r["estimator"] == e for r in rows)]
    metas = [r["meta"] for r in rows if "meta" in r]
    commits = sorted({m["commit"] for m in metas})
    dates = sorted(m["date"] for m in metas)
    loads = [m["load"][0] for m in metas]
    lines = [
        f"Cells: {len(rows)}. Commit(s) {', '.join(commits)}; trained "
        f"{dates[0] if dates else '?'} to {dates[-1] if dates else '?'}; 1-minute load "
        f"average at the start of the parts {min(loads, default=math.nan):.1f}-"
        f"{max(loads, default=math.nan):.1f} on {os.cpu_count()} cores; torch "
        f"{meta['torch']}, pyro {meta['pyro']}, {args.dtype}, one thread. "
        f"{args.num_steps} steps, {args.num_particles} particles, Adam {args.lr:g} -> "
        f"{args.final_lr:g}, seeds {args.seeds}; {args.num_draws} draws for KL and k-hat, "
        f"{args.moment_draws} for the draw errors.",
        "",
    ]
    for t in targets:
        target = TARGETS[t]()
        lines += [
            f"### {t} ({target.dim}-D, log Z = 0)",
            "",
            "| guide | estimator | KL gap ± SE | KL per seed | IW-ELBO | k-hat per seed | "
            "ms/step | ratio | vs | failures |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for g in guides:
            for e in estimators:
                a = agg.get((t, g, e))
                if a is None:
                    continue
                vs = a["counterpart"] or ""
                lines.append(
                    f"| {g} | {e} | {_fmt(a['kl_gap'], 3)} ± {_fmt(a['elbo_se'], 3)} | "
                    f"{_seeds(a['kl_seeds'])} | {_fmt(a['iw_elbo'])} | "
                    f"{_seeds(a['khat_seeds'])} | {_fmt(a['ms'])} | {_fmt(a['ratio'])} | {vs} | "
                    f"{a['errors']} |"
                )
        lines += [""]
    lines += estimator_table(agg, targets, guides, estimators, rows, args)
    lines += summary_lines(agg, targets, guides, estimators)
    return lines


def estimator_table(
    agg: dict, targets: list, guides: list, estimators: list, rows: list, args: argparse.Namespace
) -> list[str]:
    lines = [
        "### Estimators and resampling: errors of the draws",
        "",
        f"Errors of {args.moment_draws} draws, in units of the exact posterior sd, maximum over "
        "the coordinates: `mean` = max |mean - exact mean| / sd, `sd` = max |sd / exact sd - 1|. "
        "`q` = the guide's own draws; `PSIS` = as many draws PSIS-resampled (without "
        "replacement) from 10 times as many proposals (`to_arviz(..., resample=True)`), with "
        "those proposals' k-hat. `exact` = as many exact draws (the Monte Carlo floor; the "
        "funnel's x has a heavy-tailed variance, so its sd error is noisy even there).",
        "",
    ]
    for t in targets:
        target = TARGETS[t]()
        floor = {"mean_err": math.nan, "sd_err": math.nan}
        if args.moment_draws >= 2:
            floor = draw_errors(
                exact_draws(target, args.moment_draws, 30_000), exact_moments(target)
            )
        lines += [
            f"**{t}**: exact draws: mean {floor['mean_err']:.3f}, sd {floor['sd_err']:.3f}",
            "",
            "| guide | estimator | KL | k-hat | q mean | q sd | PSIS mean | PSIS sd | "
            "PSIS k-hat |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for g in guides:
            for e in estimators:
                a = agg.get((t, g, e))
                if a is None:
                    continue
                lines.append(
                    f"| {g} | {e} | {_fmt(a['kl_gap'], 3)} | {_fmt(a['khat'])} | "
                    f"{_fmt(a['mean_err'], 3)} | {_fmt(a['sd_err'], 3)} | "
                    f"{_fmt(a['rs_mean_err'], 3)} | {_fmt(a['rs_sd_err'], 3)} | "
                    f"{_fmt(a['rs_khat'])} |"
                )
        lines += [""]
    return lines


def summary_lines(agg: dict, targets: list, guides: list, estimators: list) -> list[str]:
    """Best configurations, and each of ours against AutoNormal (means over seeds)."""
    lines = ["### Best configurations (mean KL over seeds)", ""]
    lines += [
        "| target | best pyro-flowvi | KL | k-hat per seed | best peer | KL | k-hat per seed | "
        "ours / peer |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for t in targets:
        ours = [
            (g, e, agg[(t, g, e)])
            for g in guides
            for e in estimators
            if g in OURS and (t, g, e) in agg and math.isfinite(agg[(t, g, e)]["kl_gap"])
        ]
        peers = [
            (g, e, agg[(t, g, e)])
            for g in guides
            for e in estimators
            if g in MAIN_PEERS and (t, g, e) in agg and math.isfinite(agg[(t, g, e)]["kl_gap"])
        ]
        if not ours or not peers:
            continue
        og, oe, o = min(ours, key=lambda item: item[2]["kl_gap"])
        pg, pe, p = min(peers, key=lambda item: item[2]["kl_gap"])
        lines.append(
            f"| {t} | {og} / {oe} | {o['kl_gap']:.3f} | {_seeds(o['khat_seeds'])} | "
            f"{pg} / {pe} | {p['kl_gap']:.3f} | {_seeds(p['khat_seeds'])} | "
            f"{o['kl_gap'] / p['kl_gap']:.2f} |"
        )
    lines += [
        "",
        "Each pyro-flowvi cell's KL minus AutoNormal's with the same estimator (negative = "
        "better than AutoNormal):",
        "",
        "| target | estimator | " + " | ".join(g for g in guides if g in OURS) + " |",
        "|---|---|" + "---|" * len([g for g in guides if g in OURS]),
    ]
    for t in targets:
        for e in estimators:
            normal = agg.get((t, "normal", e))
            if normal is None:
                continue
            cells = []
            for g in guides:
                if g not in OURS:
                    continue
                a = agg.get((t, g, e))
                cells.append("n/a" if a is None else f"{a['kl_gap'] - normal['kl_gap']:+.3f}")
            lines.append(f"| {t} | {e} | " + " | ".join(cells) + " |")
    return lines + [""]


def write_outputs(rows: list[dict], args: argparse.Namespace, meta: dict, seconds: float) -> None:
    os.makedirs(args.outdir, exist_ok=True)
    columns = [
        "target",
        "guide",
        "estimator",
        "seed",
        "kl_gap",
        "elbo_se",
        "iw_elbo",
        "khat",
        "mean_err",
        "sd_err",
        "rs_mean_err",
        "rs_sd_err",
        "rs_khat",
        "ms",
        "ratio",
        "counterpart",
        "setup_s",
        "steps_done",
        "error",
        "run_id",
    ]
    with open(os.path.join(args.outdir, "benchmark_flow_guides.csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    lines = ["```", args.command, "```", ""] + report_lines(rows, args, meta)
    lines += ["Guides:", ""]
    lines += [f"- `{g}`: {GUIDES[g].description}" for g in args.guides]
    with open(os.path.join(args.outdir, "benchmark_flow_guides.md"), "w") as f:
        f.write("\n".join(lines) + "\n")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--num-steps", type=int, default=3000)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--num-draws", type=int, default=10000, help="draws for KL and k-hat")
    parser.add_argument(
        "--moment-draws",
        type=int,
        default=1000,
        help="draws whose mean/sd errors are reported (and resampled from 10x proposals)",
    )
    parser.add_argument(
        "--loop-draws",
        type=int,
        default=1000,
        help="draws for models that cannot be vectorized over draws (scored one at a time)",
    )
    parser.add_argument("--lr", type=float, default=1e-2)
    parser.add_argument("--final-lr", type=float, default=1e-4)
    parser.add_argument("--num-particles", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=20, help="steps left out of the timing")
    parser.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    parser.add_argument("--targets", nargs="+", default=["funnel", "banana"])
    parser.add_argument(
        "--guides",
        nargs="+",
        default=[g for g in GUIDES if g not in OPTIONAL and (g in OURS or g in MAIN_PEERS)],
        help="default: every pyro-flowvi guide and the main peers; the equal-capacity Pyro "
        f"stacks ({', '.join(EQUAL_CAPACITY)}) run when named",
    )
    parser.add_argument("--estimators", nargs="+", default=list(ESTIMATORS))
    parser.add_argument(
        "--elbo-only",
        nargs="*",
        default=ELBO_ONLY,
        help="guides trained with the plain ELBO only (to save time)",
    )
    parser.add_argument(
        "--zuko-partner-estimators",
        nargs="*",
        default=["elbo"],
        help="estimators for which the zuko process also trains `spline` (its time ratio)",
    )
    parser.add_argument("--outdir", default="/tmp/flow_guides")
    parser.add_argument("--reuse", action="store_true", help="keep cells already in the cache")
    parser.add_argument(
        "--report-only", action="store_true", help="train nothing; report the cached cells"
    )
    args = parser.parse_args(argv)
    args.command = "python benchmarks/flow_guides.py " + " ".join(
        sys.argv[1:] if argv is None else argv
    )
    return args


if __name__ == "__main__":
    main(parse_args())
