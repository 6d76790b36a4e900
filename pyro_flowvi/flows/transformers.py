r"""Elementwise monotone maps ("transformers") that a conditioner parameterises.

An autoregressive or coupling layer splits into a *conditioner*, a network that outputs
unconstrained parameters :math:`\theta_i` for every coordinate, and a *transformer*
:math:`\tau(\cdot; \theta_i)`, a strictly increasing scalar map applied to coordinate
:math:`i` (the split of zuko, distrax and flowjax):

.. math::

    y_i = \tau(x_i; \theta_i), \qquad
    \log|\det J| = \sum_i \log \tau'(x_i; \theta_i).

Every transformer here takes parameters of shape ``(..., P, D)`` (``P`` =
:attr:`~Transformer.num_params` values per coordinate, parameter-major, as a conditioner's
flat output of size ``P * D`` unflattens) that broadcast against ``x`` of shape ``(..., D)``,
and all-zero parameters give its *start*: the identity, except for the gated affine map,
whose gate starts at ``sigmoid(c)``. A conditioner whose last layer starts at zero therefore
starts the layer there.
"""

from __future__ import annotations

__all__ = [
    "AffineTransformer",
    "DeepSigmoidTransformer",
    "GatedAffineTransformer",
    "RationalQuadraticSpline",
    "Transformer",
]

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._numerics import solve_monotone


def _log_sigmoid(x: Tensor) -> Tensor:
    # Not F.logsigmoid: on CPU its autograd path costs ~18 ms per call for tiny tensors when
    # torch runs more than one thread (measured on torch 2.13); -softplus(-x) is the same
    # function, equally stable, at a few microseconds.
    return -F.softplus(-x)


def _expand(value: Tensor, shape: torch.Size) -> Tensor:
    """``value.expand(shape)``, without an autograd node when the shape is already right."""
    if torch.jit.is_tracing():  # sizes are tensors then
        return value.expand(shape)
    return value if value.shape == shape else value.expand(shape)


def _log_sigmoid_exact(x: Tensor) -> Tensor:
    # softplus turns linear above its threshold (20 by default), dropping log1p(e^-20) = 2e-9;
    # above 40 the dropped term is below float64's resolution, and e^40 fits float32.
    return -F.softplus(-x, threshold=40.0)


class Transformer(nn.Module):
    r"""Base class: a strictly increasing elementwise map with ``num_params`` parameters per
    coordinate.

    Subclass contract: ``forward(x, params) -> (y, log_dy_dx)`` and
    ``inverse(y, params) -> (x, log_dx_dy)``, all of shape ``(..., D)`` (the log-derivatives
    elementwise, not summed), with ``params`` of shape ``(..., num_params, D)``; all-zero
    parameters give the start. No learnable state: the parameters come from the conditioner.
    """

    #: Parameters per coordinate, so ``params`` has shape ``(..., num_params, D)``.
    num_params: int = 0

    def forward(self, x: Tensor, params: Tensor) -> tuple[Tensor, Tensor]:
        """``(y, log_dy_dx)``, elementwise, both of the shape ``(..., D)`` of ``x``."""
        raise NotImplementedError

    def inverse(self, y: Tensor, params: Tensor) -> tuple[Tensor, Tensor]:
        """``(x, log_dx_dy)``, elementwise, both of the shape ``(..., D)`` of ``y``."""
        raise NotImplementedError

    def inverse_at(self, y: Tensor, x: Tensor, params: Tensor) -> tuple[Tensor, Tensor]:
        r"""The inverse at a known root :math:`x` of :math:`\tau(x; \theta) = y`: the value
        ``x``, the derivatives of :math:`\tau^{-1}(y; \theta)` (one Newton step from the
        root, whose residual is zero, so only its derivatives count), and
        ``-log tau'(x; theta)`` with its derivatives. Shapes as :meth:`inverse`."""
        x = x.detach()
        value, log_derivative = self.forward(x, params)
        step = (value - y) * torch.exp(-log_derivative.detach())
        x = x - (step - step.detach())  # exactly x (step - step is 0), derivatives of -step
        _, log_derivative = self.forward(x, params)
        return x, -log_derivative

    def _check_params(self, params: Tensor) -> None:
        if torch.jit.is_tracing():  # sizes are tensors then; a trace has fixed shapes anyway
            return
        if params.dim() < 2 or params.shape[-2] != self.num_params:
            raise ValueError(
                f"{type(self).__name__}: params must have shape (..., {self.num_params}, D), "
                f"got {tuple(params.shape)}"
            )


class AffineTransformer(Transformer):
    r"""Affine map with a softly bounded log-scale.

    .. math::

        \theta = (t, \hat s), \quad \ell = b \tanh(\hat s / b), \quad
        y = t + e^{\ell} x, \quad \log \tau' = \ell

    The bound :math:`b` is smooth, not a clamp: the gradient fades as :math:`\ell` nears
    :math:`\pm b` instead of passing through unchanged. Zero parameters: the identity.

    Arguments:
        max_log_scale: :math:`b > 0` (default 3).
    """

    num_params = 2

    def __init__(self, max_log_scale: float = 3.0) -> None:
        super().__init__()
        if not max_log_scale > 0:
            raise ValueError(f"AffineTransformer: max_log_scale must be > 0, got {max_log_scale}")
        self.max_log_scale = float(max_log_scale)

    def _shift_log_scale(self, params: Tensor) -> tuple[Tensor, Tensor]:
        self._check_params(params)
        shift, raw = params.unbind(-2)
        return shift, self.max_log_scale * torch.tanh(raw / self.max_log_scale)

    def forward(self, x: Tensor, params: Tensor) -> tuple[Tensor, Tensor]:
        shift, log_scale = self._shift_log_scale(params)
        y = shift + torch.exp(log_scale) * x
        return y, _expand(log_scale, y.shape)

    def inverse(self, y: Tensor, params: Tensor) -> tuple[Tensor, Tensor]:
        shift, log_scale = self._shift_log_scale(params)
        x = (y - shift) / torch.exp(log_scale)
        return x, -log_scale.expand(x.shape)

    def extra_repr(self) -> str:
        return f"max_log_scale={self.max_log_scale}"


class GatedAffineTransformer(Transformer):
    r"""The gated update of IAF (Kingma et al., 2016).

    .. math::

        \theta = (m, s), \quad \sigma = \mathrm{sigmoid}(s + c), \quad
        y = \sigma x + (1 - \sigma) m, \quad \log \tau' = \log \sigma

    A gate can only shrink. Zero parameters: :math:`y = \mathrm{sigmoid}(c)\, x` (0.88 x for
    the default :math:`c = 2`).

    Arguments:
        sigmoid_bias: the gate bias :math:`c` (default 2).
    """

    num_params = 2

    def __init__(self, sigmoid_bias: float = 2.0) -> None:
        super().__init__()
        self.sigmoid_bias = float(sigmoid_bias)

    def _update(self, params: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``(a, s, log s)`` of the update ``y = a + s * x``."""
        self._check_params(params)
        shift, raw = params.unbind(-2)
        gate = raw + self.sigmoid_bias
        return torch.sigmoid(-gate) * shift, torch.sigmoid(gate), _log_sigmoid(gate)

    def forward(self, x: Tensor, params: Tensor) -> tuple[Tensor, Tensor]:
        shift, scale, log_scale = self._update(params)
        y = shift + scale * x
        return y, _expand(log_scale, y.shape)

    def inverse(self, y: Tensor, params: Tensor) -> tuple[Tensor, Tensor]:
        shift, scale, log_scale = self._update(params)
        x = (y - shift) / scale
        return x, -log_scale.expand(x.shape)

    def extra_repr(self) -> str:
        return f"sigmoid_bias={self.sigmoid_bias}"


def _gather(values: Tensor, index: Tensor) -> Tensor:
    """``values[..., index]`` along the last dim, for ``index`` of shape ``values.shape[:-1]``."""
    return values.gather(-1, index.unsqueeze(-1)).squeeze(-1)


class RationalQuadraticSpline(Transformer):
    r"""Monotone rational-quadratic spline on :math:`[-B, B]` with linear (identity) tails
    (Durkan et al., 2019).

    ``bins`` = K bins with knots :math:`(x_k, y_k)`, :math:`x_0 = y_0 = -B`,
    :math:`x_K = y_K = B`, widths and heights from softmaxes, derivatives :math:`d_k > 0` at the
    interior knots and :math:`d_0 = d_K = 1` at the ends, so the map and its derivative are
    continuous where the identity tails begin. In bin k, with :math:`w_k, h_k` its width and
    height, :math:`s_k = h_k / w_k` and :math:`\xi = (x - x_k) / w_k \in [0, 1]`:

    .. math::

        y = y_k + \frac{h_k\,[s_k \xi^2 + d_k \xi (1 - \xi)]}
                       {s_k + (d_{k+1} + d_k - 2 s_k)\, \xi (1 - \xi)}, \qquad
        \tau'(x) = \frac{s_k^2\,[d_{k+1} \xi^2 + 2 s_k \xi (1 - \xi) + d_k (1 - \xi)^2]}
                        {[s_k + (d_{k+1} + d_k - 2 s_k)\, \xi (1 - \xi)]^2}.

    The inverse solves, in the bin of :math:`y`, the quadratic
    :math:`a \xi^2 + b \xi + c = 0` with :math:`a = h_k (s_k - d_k) + (y - y_k) \delta`,
    :math:`b = h_k d_k - (y - y_k) \delta`, :math:`c = -s_k (y - y_k)`,
    :math:`\delta = d_{k+1} + d_k - 2 s_k`, by the cancellation-free root
    :math:`\xi = 2c / (-b - \sqrt{b^2 - 4ac})`. Outside :math:`[-B, B]` the map is the identity.

    Parameters per coordinate: K width logits, K height logits and K - 1 derivative
    pre-activations (:math:`P = 3K - 1`). Widths are
    :math:`w_{\min} + (1 - K w_{\min}) \operatorname{softmax}`, likewise the heights, and
    :math:`d = d_{\min} + \operatorname{softplus}(\hat d + \log(e^{1 - d_{\min}} - 1))`, so
    zero parameters give equal bins and unit derivatives: the identity.

    Arguments:
        bins: K (default 8).
        bound: B (default 5).
        min_bin_width, min_bin_height: as fractions of :math:`2B` (default 1e-3).
        min_derivative: :math:`d_{\min}` (default 1e-3).

    References:
        Neural Spline Flows (Durkan, Bekasov, Murray & Papamakarios, 2019, arXiv:1906.04032)
    """

    def __init__(
        self,
        bins: int = 8,
        bound: float = 5.0,
        min_bin_width: float = 1e-3,
        min_bin_height: float = 1e-3,
        min_derivative: float = 1e-3,
    ) -> None:
        super().__init__()
        if isinstance(bins, bool) or not isinstance(bins, int) or bins < 1:
            raise ValueError(f"RationalQuadraticSpline: bins must be an int >= 1, got {bins!r}")
        if not bound > 0:
            raise ValueError(f"RationalQuadraticSpline: bound must be > 0, got {bound!r}")
        for name, value in [("min_bin_width", min_bin_width), ("min_bin_height", min_bin_height)]:
            if not 0 <= value * bins < 1:
                raise ValueError(
                    f"RationalQuadraticSpline: {name} must be in [0, 1/bins) = [0, {1 / bins}), "
                    f"got {value!r}"
                )
        if not 0 <= min_derivative < 1:
            raise ValueError(
                "RationalQuadraticSpline: min_derivative must be in [0, 1), "
                f"got {min_derivative!r}"
            )
        self.bins = bins
        self.bound = float(bound)
        self.min_bin_width = float(min_bin_width)
        self.min_bin_height = float(min_bin_height)
        self.min_derivative = float(min_derivative)
        self._derivative_offset = math.log(math.expm1(1.0 - min_derivative))
        self.num_params = 3 * bins - 1

    def _knots(self, logits: Tensor, minimum: float) -> tuple[Tensor, Tensor]:
        """Bin sizes and knot positions, shapes ``(..., K)`` and ``(..., K + 1)``."""
        sizes = minimum + (1 - minimum * self.bins) * torch.softmax(logits, dim=-1)
        knots = F.pad(torch.cumsum(sizes, dim=-1), (1, 0))
        knots = 2 * self.bound * knots - self.bound
        # The last knot is B exactly (the cumulative sum is 1 only up to rounding).
        knots = torch.cat([knots[..., :-1], torch.full_like(knots[..., -1:], self.bound)], -1)
        return knots[..., 1:] - knots[..., :-1], knots

    def _spline(
        self, params: Tensor, batch_shape: torch.Size
    ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        """``(widths, x knots, heights, y knots, derivatives)``, last dims K, K+1, K, K+1, K+1."""
        self._check_params(params)
        params = params.expand(batch_shape + params.shape[-2:]).movedim(-2, -1)  # (..., D, P)
        k = self.bins
        widths, x_knots = self._knots(params[..., :k], self.min_bin_width)
        heights, y_knots = self._knots(params[..., k : 2 * k], self.min_bin_height)
        inner = self.min_derivative + F.softplus(params[..., 2 * k :] + self._derivative_offset)
        one = inner.new_ones(inner.shape[:-1] + (1,))
        return widths, x_knots, heights, y_knots, torch.cat([one, inner, one], dim=-1)

    def _bin(self, value: Tensor, knots: Tensor) -> Tensor:
        return (value.unsqueeze(-1) >= knots[..., 1:-1]).sum(-1)

    def forward(self, x: Tensor, params: Tensor) -> tuple[Tensor, Tensor]:
        batch = torch.broadcast_shapes(x.shape, params.shape[:-2] + params.shape[-1:])
        widths, x_knots, heights, y_knots, derivatives = self._spline(params, batch[:-1])
        x = x.expand(batch)
        inside = (x >= -self.bound) & (x <= self.bound)
        x_in = x.clamp(-self.bound, self.bound)  # finite values (and gradients) in both branches
        index = self._bin(x_in, x_knots)
        w, h = _gather(widths, index), _gather(heights, index)
        x_k, y_k = _gather(x_knots, index), _gather(y_knots, index)
        d_k, d_k1 = _gather(derivatives, index), _gather(derivatives[..., 1:], index)
        slope = h / w
        xi = ((x_in - x_k) / w).clamp(0, 1)
        xi_1m = xi * (1 - xi)
        denominator = slope + (d_k1 + d_k - 2 * slope) * xi_1m
        y = y_k + h * (slope * xi * xi + d_k * xi_1m) / denominator
        numerator = d_k1 * xi * xi + 2 * slope * xi_1m + d_k * (1 - xi) * (1 - xi)
        log_derivative = 2 * torch.log(slope) + torch.log(numerator) - 2 * torch.log(denominator)
        return torch.where(inside, y, x), torch.where(inside, log_derivative, 0.0)

    def inverse(self, y: Tensor, params: Tensor) -> tuple[Tensor, Tensor]:
        batch = torch.broadcast_shapes(y.shape, params.shape[:-2] + params.shape[-1:])
        widths, x_knots, heights, y_knots, derivatives = self._spline(params, batch[:-1])
        y = y.expand(batch)
        inside = (y >= -self.bound) & (y <= self.bound)
        y_in = y.clamp(-self.bound, self.bound)
        index = self._bin(y_in, y_knots)
        w, h = _gather(widths, index), _gather(heights, index)
        x_k, y_k = _gather(x_knots, index), _gather(y_knots, index)
        d_k, d_k1 = _gather(derivatives, index), _gather(derivatives[..., 1:], index)
        slope = h / w
        delta = d_k1 + d_k - 2 * slope
        offset = y_in - y_k
        a = h * (slope - d_k) + offset * delta
        b = h * d_k - offset * delta
        c = -slope * offset
        discriminant = (b * b - 4 * a * c).clamp(min=0)
        xi = (2 * c / (-b - torch.sqrt(discriminant))).clamp(0, 1)
        x = x_k + xi * w
        xi_1m = xi * (1 - xi)
        denominator = slope + delta * xi_1m
        numerator = d_k1 * xi * xi + 2 * slope * xi_1m + d_k * (1 - xi) * (1 - xi)
        log_derivative = 2 * torch.log(slope) + torch.log(numerator) - 2 * torch.log(denominator)
        return torch.where(inside, x, y), torch.where(inside, -log_derivative, 0.0)

    def extra_repr(self) -> str:
        return f"bins={self.bins}, bound={self.bound}"


class DeepSigmoidTransformer(Transformer):
    r"""Deep sigmoidal flow transformer of a neural autoregressive flow (Huang et al., 2018).

    .. math::

        \tau(x) = \operatorname{logit}\Bigl(\sum_{j=1}^{H} w_j\,
            \operatorname{sigmoid}(a_j x + b_j)\Bigr), \qquad
        a_j = \operatorname{softplus}(\hat a_j + \log(e - 1)) > 0, \quad
        w = \operatorname{softmax}(\hat w), \quad b_j = \hat b_j + \beta_j

    is strictly increasing (a positive mixture of increasing sigmoids, then the increasing
    logit). Every term is evaluated in log space, so neither the value nor the log-derivative
    under- or overflows: with :math:`u_j = a_j x + b_j` and :math:`S = \sum_j w_j
    \sigma(u_j)`,

    .. math::

        \log S = \operatorname{LSE}_j(\log w_j + \log\sigma(u_j)), \quad
        \log(1 - S) = \operatorname{LSE}_j(\log w_j + \log\sigma(-u_j)), \quad
        \tau = \log S - \log(1 - S),

        \log \tau' = \operatorname{LSE}_j\bigl(\log w_j + \log a_j + \log\sigma(u_j)
            + \log\sigma(-u_j)\bigr) - \log S - \log(1 - S).

    The offsets :math:`\beta_j` are spread evenly over :math:`[-\beta, \beta]` (default
    :math:`\beta = 0.5`): with identical units every unit would get the same gradient forever.
    Zero parameters therefore give a near-identity odd map :math:`\tau_0` with
    :math:`\tau_0(0) = 0`; for H = 8 and :math:`\beta = 0.5`,
    :math:`|\tau_0(x) - x| \le 0.053` and :math:`|\log \tau_0'(x)| \le 0.027` for every x
    (the map is exactly the identity for :math:`\beta = 0`).

    The inverse solves :math:`\tau(x) = y` per coordinate by Newton steps safeguarded with
    bisection inside the bracket :math:`[\min_j (y - b_j) / a_j, \max_j (y - b_j) / a_j]`
    (at its ends every sigmoid is below, respectively above, :math:`\sigma(y)`), then one
    Newton step with autograd on gives the implicit-function gradient.

    Arguments:
        hidden_units: H (default 8); ``num_params = 3 H``.
        offset_spread: :math:`\beta \ge 0` (default 1).

    References:
        Neural Autoregressive Flows (Huang, Krueger, Lacoste & Courville, 2018,
        arXiv:1804.00779)
    """

    def __init__(self, hidden_units: int = 8, offset_spread: float = 0.5) -> None:
        super().__init__()
        if isinstance(hidden_units, bool) or not isinstance(hidden_units, int) or hidden_units < 1:
            raise ValueError(
                f"DeepSigmoidTransformer: hidden_units must be an int >= 1, got {hidden_units!r}"
            )
        if not offset_spread >= 0:
            raise ValueError(
                f"DeepSigmoidTransformer: offset_spread must be >= 0, got {offset_spread!r}"
            )
        self.hidden_units = hidden_units
        self.offset_spread = float(offset_spread)
        self.num_params = 3 * hidden_units
        offsets = (
            torch.linspace(-offset_spread, offset_spread, hidden_units)
            if hidden_units > 1
            else torch.zeros(1)
        )
        self.register_buffer("offsets", offsets, persistent=False)

    def _units(self, params: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """``(log w, a, log a, b)``, each of shape ``(..., D, H)``."""
        self._check_params(params)
        params = params.movedim(-2, -1)  # (..., D, 3H)
        h = self.hidden_units
        raw_a, raw_b, raw_w = params[..., :h], params[..., h : 2 * h], params[..., 2 * h :]
        a = F.softplus(raw_a + math.log(math.e - 1))
        log_w = torch.log_softmax(raw_w, dim=-1)
        return log_w, a, torch.log(a), raw_b + self.offsets

    @staticmethod
    def _evaluate(
        x: Tensor, log_w: Tensor, a: Tensor, log_a: Tensor, b: Tensor
    ) -> tuple[Tensor, Tensor]:
        u = a * x.unsqueeze(-1) + b
        log_sig, log_sig_neg = _log_sigmoid_exact(u), _log_sigmoid_exact(-u)
        log_s = torch.logsumexp(log_w + log_sig, dim=-1)
        log_1ms = torch.logsumexp(log_w + log_sig_neg, dim=-1)
        log_derivative = torch.logsumexp(log_w + log_a + log_sig + log_sig_neg, dim=-1)
        return log_s - log_1ms, log_derivative - log_s - log_1ms

    def forward(self, x: Tensor, params: Tensor) -> tuple[Tensor, Tensor]:
        return self._evaluate(x, *self._units(params))

    def inverse(self, y: Tensor, params: Tensor) -> tuple[Tensor, Tensor]:
        log_w, a, log_a, b = self._units(params)
        batch = torch.broadcast_shapes(y.shape, log_w.shape[:-1])
        y = y.expand(batch)
        with torch.no_grad():
            ends = (y.unsqueeze(-1) - b) / a
            lower, upper = ends.amin(-1), ends.amax(-1)
            units = (log_w.detach(), a.detach(), log_a.detach(), b.detach())

            def function(value: Tensor) -> tuple[Tensor, Tensor]:
                image, log_slope = self._evaluate(value, *units)
                return image - y, torch.exp(log_slope)

            root = solve_monotone(function, lower, upper)
        image, log_slope = self._evaluate(root, log_w, a, log_a, b)
        x = root - (image - y) * torch.exp(-log_slope)  # the implicit-function gradient
        return x, -self._evaluate(x, log_w, a, log_a, b)[1]

    def extra_repr(self) -> str:
        return f"hidden_units={self.hidden_units}, offset_spread={self.offset_spread}"
