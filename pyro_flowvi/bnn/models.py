r"""Small Bayesian networks written the plain Pyro way, for examples, tests and benchmarks.

Each layer is a ``PyroModule[nn.Linear]`` or ``PyroModule[nn.Conv2d]`` whose weight and bias
are ``PyroSample`` sites with the prior :math:`\mathcal N(0, s^2)`; the likelihood sits in
``pyro.plate("data", size=num_data, subsample=...)`` so a mini-batch is scaled to the full data
set. Nothing here is specific to a guide: the same model runs with MCMC, ``AutoNormal``,
:class:`~pyro_flowvi.bnn.AutoMeanFieldGuide` or :class:`~pyro_flowvi.bnn.AutoMNFGuide`. The
prior scale is a buffer, so ``model.to(device)`` moves the priors too.

Regression with a learned noise level (the UCI protocol of Hernandez-Lobato & Adams, 2015)
puts a Gamma prior on the noise precision :math:`\tau` of a Gaussian likelihood,

.. math::

    \tau \sim \mathrm{Gamma}(\alpha, \beta), \qquad
    y_n \mid W, \tau \sim \mathcal N\bigl(f_W(x_n), \tau^{-1}\bigr),

sampled at the global site ``"noise_precision"`` (``BayesianMLP(..., likelihood="normal",
noise_precision_prior=(alpha, beta))``); PBP uses :math:`\alpha = \beta = 6` on standardized
targets, a prior noise standard deviation near 1 that the data quickly overrule.
"""

from __future__ import annotations

__all__ = ["NOISE_SITE", "BayesianConvNet", "BayesianMLP", "bayesian_layer"]

from collections.abc import Sequence

import pyro
import pyro.distributions as dist
import torch
import torch.nn.functional as F
from pyro.nn import PyroModule, PyroSample
from pyro.nn.module import to_pyro_module_
from torch import Tensor, nn

_LIKELIHOODS = ("categorical", "normal")
#: Name of the sample site of the observation-noise precision of a ``"normal"`` likelihood.
NOISE_SITE = "noise_precision"


class _NormalPrior:
    """A picklable ``PyroSample`` prior N(0, module.prior_scale^2) of a fixed shape."""

    def __init__(self, shape: torch.Size) -> None:
        self.shape = torch.Size(shape)

    def __call__(self, module: nn.Module) -> dist.Distribution:
        scale = module.prior_scale
        return (
            dist.Normal(torch.zeros_like(scale), scale)
            .expand(self.shape)
            .to_event(len(self.shape))
        )


def bayesian_layer(layer: nn.Linear | nn.Conv2d, prior_scale: float = 1.0) -> PyroModule:
    """Turn an ``nn.Linear`` / ``nn.Conv2d`` into a ``PyroModule`` with N(0, s^2) priors, in place.

    Arguments:
        layer: the layer (its parameters only give the shapes).
        prior_scale: :math:`s > 0`.
    """
    if not isinstance(layer, nn.Linear | nn.Conv2d):
        raise TypeError(f"bayesian_layer expects nn.Linear or nn.Conv2d, got {type(layer)}")
    if not prior_scale > 0:
        raise ValueError(f"bayesian_layer: prior_scale must be > 0, got {prior_scale}")
    shapes = {name: p.shape for name, p in layer.named_parameters()}
    to_pyro_module_(layer)
    layer.register_buffer(
        "prior_scale", torch.tensor(float(prior_scale), dtype=torch.get_default_dtype())
    )
    for name, shape in shapes.items():
        delattr(layer, name)
        setattr(layer, name, PyroSample(_NormalPrior(shape)))
    return layer


def _check(name: str, likelihood: str, noise_scale: float, dims: Sequence[int]) -> None:
    if likelihood not in _LIKELIHOODS:
        raise ValueError(f"{name}: likelihood must be one of {_LIKELIHOODS}, got {likelihood!r}")
    if not noise_scale > 0:
        raise ValueError(f"{name}: noise_scale must be > 0, got {noise_scale}")
    if any(isinstance(d, bool) or not isinstance(d, int) or d < 1 for d in dims):
        raise ValueError(f"{name}: layer sizes must be positive ints, got {list(dims)}")


def _check_noise_prior(
    likelihood: str, noise_scale: float | None, prior: tuple[float, float] | None
) -> tuple[float, float] | None:
    if prior is None:
        return None
    if likelihood != "normal":
        raise ValueError(
            "BayesianMLP: noise_precision_prior needs likelihood='normal', got "
            f"likelihood={likelihood!r}"
        )
    if noise_scale is not None:
        raise ValueError(
            f"BayesianMLP: pass noise_scale (fixed noise, got {noise_scale}) or "
            f"noise_precision_prior (learned noise, got {prior}), not both"
        )
    try:
        alpha, beta = (float(v) for v in prior)
    except (TypeError, ValueError):
        raise ValueError(
            "BayesianMLP: noise_precision_prior must be a pair (concentration, rate), got "
            f"{prior!r}"
        ) from None
    if not (alpha > 0 and beta > 0):
        raise ValueError(
            "BayesianMLP: noise_precision_prior needs concentration > 0 and rate > 0, got "
            f"{prior!r}"
        )
    return alpha, beta


class _BayesianNet(PyroModule):
    likelihood: str
    noise_scale: float
    learned_noise: bool = False

    def features(self, x: Tensor) -> Tensor:
        raise NotImplementedError

    def forward(self, x: Tensor, y: Tensor | None = None, num_data: int | None = None) -> Tensor:
        """Run the model on a mini-batch.

        Arguments:
            x: inputs of shape ``(B, ...)``.
            y: class labels ``(B,)`` (categorical) or targets ``(B,)`` (normal); ``None`` to
                sample them.
            num_data: the training-set size N; the likelihood is scaled by N / B.

        Returns:
            The logits ``(B, C)`` or the regression mean ``(B,)``, also recorded at the
            deterministic site ``"logits"`` / ``"mean"`` for ``Predictive``.
        """
        out = self.features(x)
        batch = x.shape[0]
        if y is not None and y.shape != (batch,):
            raise ValueError(
                f"{type(self).__name__}: site 'obs' needs targets y of shape ({batch},) for x "
                f"of shape {tuple(x.shape)}, got {tuple(y.shape)}"
            )
        if num_data is not None and num_data < batch:
            raise ValueError(
                f"{type(self).__name__}: num_data (the training-set size) must be >= the batch "
                f"size {batch}, got {num_data}"
            )
        noise_scale: Tensor | float = self.noise_scale
        if self.learned_noise:
            precision = pyro.sample(
                NOISE_SITE, dist.Gamma(self.noise_concentration, self.noise_rate)
            )
            noise_scale = precision.rsqrt()
        with pyro.plate("data", size=num_data or batch, subsample=torch.arange(batch)):
            if self.likelihood == "categorical":
                pyro.deterministic("logits", out, event_dim=1)
                pyro.sample("obs", dist.Categorical(logits=out), obs=y)
            else:
                out = out.squeeze(-1)
                pyro.deterministic("mean", out)
                pyro.sample("obs", dist.Normal(out, noise_scale), obs=y)
        return out


class BayesianMLP(_BayesianNet):
    r"""A Bayesian multilayer perceptron (ReLU hidden layers) as a plain Pyro model.

    Arguments:
        in_features: input size.
        out_features: number of classes (categorical) or 1 (normal).
        hidden_dims: hidden widths.
        prior_scale: :math:`s` in the :math:`\mathcal N(0, s^2)` prior on weights and biases.
        likelihood: ``"categorical"`` (logits) or ``"normal"`` (homoscedastic regression).
        noise_scale: a fixed observation noise of the normal likelihood (default 1).
        noise_precision_prior: ``(alpha, beta)``: learn the noise instead, with the prior
            :math:`\tau \sim \mathrm{Gamma}(\alpha, \beta)` on its precision at the site
            ``"noise_precision"`` (see the module docstring); excludes ``noise_scale``.

    Example:
        >>> model = BayesianMLP(64, 5, hidden_dims=(50,))
        >>> logits = model(torch.randn(8, 64))  # a draw from the prior predictive
        >>> regression = BayesianMLP(8, 1, (50,), likelihood="normal",
        ...                          noise_precision_prior=(6.0, 6.0))
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        hidden_dims: Sequence[int] = (100,),
        *,
        prior_scale: float = 1.0,
        likelihood: str = "categorical",
        noise_scale: float | None = None,
        noise_precision_prior: tuple[float, float] | None = None,
    ) -> None:
        super().__init__()
        sizes = (in_features, *hidden_dims, out_features)
        prior = _check_noise_prior(likelihood, noise_scale, noise_precision_prior)
        noise_scale = 1.0 if noise_scale is None else noise_scale
        _check("BayesianMLP", likelihood, noise_scale, sizes)
        if likelihood == "normal" and out_features != 1:
            raise ValueError(
                f"BayesianMLP: the normal likelihood needs out_features=1, got {out_features}"
            )
        self.likelihood, self.noise_scale = likelihood, float(noise_scale)
        self.learned_noise = prior is not None
        if prior is not None:
            dtype = torch.get_default_dtype()
            self.register_buffer("noise_concentration", torch.tensor(prior[0], dtype=dtype))
            self.register_buffer("noise_rate", torch.tensor(prior[1], dtype=dtype))
        self.layers = PyroModule[nn.ModuleList](
            [
                bayesian_layer(nn.Linear(n_in, n_out), prior_scale)
                for n_in, n_out in zip(sizes[:-1], sizes[1:], strict=True)
            ]
        )

    def features(self, x: Tensor) -> Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < len(self.layers) - 1:
                x = F.relu(x)
        return x


class BayesianConvNet(_BayesianNet):
    r"""A small Bayesian conv net for square gray images: two 3x3 convs with ReLU and 2x2
    max-pooling, then a dense layer.

    Arguments:
        image_size: side of the (square, one-channel) images; inputs may be flat ``(B, S*S)``.
        out_features: number of classes.
        channels: output channels of the two conv layers.
        prior_scale: :math:`s` in the :math:`\mathcal N(0, s^2)` prior.

    Example:
        >>> model = BayesianConvNet(8, 5)
        >>> logits = model(torch.randn(4, 64))
    """

    def __init__(
        self,
        image_size: int,
        out_features: int,
        channels: Sequence[int] = (16, 32),
        *,
        prior_scale: float = 1.0,
    ) -> None:
        super().__init__()
        channels = tuple(channels)
        _check("BayesianConvNet", "categorical", 1.0, (image_size, out_features, *channels))
        if len(channels) != 2 or image_size % 4:
            raise ValueError(
                "BayesianConvNet: needs two conv channel sizes and an image_size divisible by "
                f"4, got channels={channels}, image_size={image_size}"
            )
        self.likelihood, self.noise_scale = "categorical", 1.0
        self.image_size = image_size
        self.conv1 = bayesian_layer(nn.Conv2d(1, channels[0], 3, padding=1), prior_scale)
        self.conv2 = bayesian_layer(nn.Conv2d(channels[0], channels[1], 3, padding=1), prior_scale)
        flat = channels[1] * (image_size // 4) ** 2
        self.fc = bayesian_layer(nn.Linear(flat, out_features), prior_scale)

    def features(self, x: Tensor) -> Tensor:
        x = x.reshape(-1, 1, self.image_size, self.image_size)
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        return self.fc(x.flatten(1))
