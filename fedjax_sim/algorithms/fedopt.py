"""The FedOpt family: FedAvg clients, the adaptive server step of Reddi et al.

Algorithm 2 of the paper, for the average client delta
`Delta_t = mean_i(x_i - x_t)` of round t:

    m_t = b1 * m_{t-1} + (1 - b1) * Delta_t
    v_t = v_{t-1} + Delta_t^2                                      (FedAdagrad)
    v_t = v_{t-1} - (1 - b2) * Delta_t^2 * sign(v_{t-1} - Delta_t^2)  (FedYogi)
    v_t = b2 * v_{t-1} + (1 - b2) * Delta_t^2                      (FedAdam)
    x_{t+1} = x_t + eta * m_t / (sqrt(v_t) + tau)

from `m_{-1} = 0` and `v_{-1} = tau^2`, with no bias correction. `fed_adam`,
`fed_yogi` and `fed_adagrad` are this step as optax transforms. They are not
`optax.adam`, `optax.yogi` and `optax.adagrad`: optax's Adam and Yogi correct
the moments' bias, default to b2 = 0.999, and Yogi starts both moments at
1e-6; optax's Adagrad has no momentum, puts its epsilon inside the square root
and starts its accumulator at 0.1. At the paper's tau = 1e-3 the first step
can differ by orders of magnitude. The plain optax optimizers remain available
as any server optimizer of `fedavg`
(`fedavg(model, client_optimizer, optax.adam(...), local)`).

Sign convention: `fedavg` hands its server optimizer the pseudo-gradient
`g = -Delta_t` and adds the returned updates to the model, like any optax
optimizer. The transforms keep `mu = -m_t` (the first moment of what they
receive, as optax does) and return `-eta * mu / (sqrt(v_t) + tau)`, so the
model moves by exactly `+eta * m_t / (sqrt(v_t) + tau)`.

Defaults are the paper's: b1 = 0.9 and b2 = 0.99 for FedAdam and FedYogi,
tau = 1e-3 (its recommended adaptivity). Algorithm 2 gives FedAdagrad the same
momentum line, but the paper's FedAdagrad runs without momentum (b1 = 0, plain
Adagrad on the server), so that is `fed_adagrad`'s default.

References:
  Reddi, Charles, Zaheer, Garrett, Rush, Konecny, Kumar, McMahan. "Adaptive
  Federated Optimization", ICLR 2021 (Algorithm 2).
"""

from __future__ import annotations

import dataclasses
from typing import Callable, ClassVar, Literal, NamedTuple

import jax
import jax.numpy as jnp
import optax

from fedjax_sim.algorithms.fedavg import fedavg, weighting_of
from fedjax_sim.algorithms.rules import optimizers
from fedjax_sim.core.algorithm import Algorithm, LocalConfig
from fedjax_sim.core.model import Model
from fedjax_sim.core.registry import ALGORITHMS, AlgorithmSection
from fedjax_sim.core.schema import ConfigError, OptimizerConfig, option, positive, server_sgd


class FedOptState(NamedTuple):
  """State of the paper-exact FedOpt server transforms.

  Attributes:
    mu: minus Algorithm 2's `m_t`: the moving average of the pseudo-gradients
      `-Delta_t` the transform receives (zeros at first).
    nu: Algorithm 2's `v_t` (`tau^2` at first).
  """

  mu: optax.Updates
  nu: optax.Updates


# v_t from v_{t-1} and Delta_t^2 (elementwise).
_SecondMoment = Callable[[jax.Array, jax.Array], jax.Array]


def _check_decay(value: float, name: str) -> None:
  if not 0 <= value < 1:
    raise ValueError(f"{name} must be in [0, 1) (Algorithm 2 of Reddi et al.); got {value!r}.")


def _check_tau(tau: float) -> None:
  if not tau > 0:
    raise ValueError(f"tau must be > 0 (the adaptivity of Reddi et al.); got {tau!r}.")


def _scale_by_fedopt(second_moment: _SecondMoment, b1: float,
                     tau: float) -> optax.GradientTransformation:
  """Algorithm 2's step direction for a given second-moment rule."""
  _check_decay(b1, "b1")
  _check_tau(tau)

  def init_fn(params):
    return FedOptState(mu=jax.tree.map(jnp.zeros_like, params),
                       nu=jax.tree.map(lambda p: jnp.full_like(p, tau**2), params))

  def update_fn(updates, state, params=None):
    del params
    # m_t in the pseudo-gradient's sign: b1 * (-m_{t-1}) + (1 - b1) * (-Delta_t).
    mu = jax.tree.map(lambda m, g: b1 * m + (1 - b1) * g, state.mu, updates)
    nu = jax.tree.map(lambda v, g: second_moment(v, jnp.square(g)), state.nu, updates)
    # No bias correction; tau outside the square root.
    direction = jax.tree.map(lambda m, v: m / (jnp.sqrt(v) + tau), mu, nu)
    return direction, FedOptState(mu=mu, nu=nu)

  return optax.GradientTransformation(init_fn, update_fn)


def scale_by_fed_adam(b1: float = 0.9, b2: float = 0.99,
                      tau: float = 1e-3) -> optax.GradientTransformation:
  """FedAdam's direction `-m_t / (sqrt(v_t) + tau)`, v_t = b2 v_{t-1} + (1 - b2) Delta_t^2."""
  _check_decay(b2, "b2")
  return _scale_by_fedopt(lambda v, d2: b2 * v + (1 - b2) * d2, b1, tau)


def scale_by_fed_yogi(b1: float = 0.9, b2: float = 0.99,
                      tau: float = 1e-3) -> optax.GradientTransformation:
  """FedYogi's direction, v_t = v_{t-1} - (1 - b2) Delta_t^2 sign(v_{t-1} - Delta_t^2)."""
  _check_decay(b2, "b2")
  return _scale_by_fedopt(lambda v, d2: v - (1 - b2) * d2 * jnp.sign(v - d2), b1, tau)


def scale_by_fed_adagrad(b1: float = 0.0, tau: float = 1e-3) -> optax.GradientTransformation:
  """FedAdagrad's direction, v_t = v_{t-1} + Delta_t^2."""
  return _scale_by_fedopt(lambda v, d2: v + d2, b1, tau)


def fed_adam(learning_rate: optax.ScalarOrSchedule, b1: float = 0.9, b2: float = 0.99,
             tau: float = 1e-3) -> optax.GradientTransformation:
  """The server step of FedAdam exactly as in Reddi et al. 2021, Algorithm 2.

  Unlike `optax.adam`: no bias correction, `v` starts at `tau^2`, and the
  defaults are the paper's.

  Args:
    learning_rate: the server learning rate eta (a float or an optax schedule
      of the round).
    b1: momentum of the average client delta, in [0, 1).
    b2: decay of the second moment, in [0, 1).
    tau: adaptivity, > 0: added to `sqrt(v_t)`, and `v_{-1} = tau^2`.

  Returns:
    An optax transform to be given the pseudo-gradient `-Delta_t` (as
    `fedavg` does); its updates move the model by `eta * m_t / (sqrt(v_t) +
    tau)`. Its state is `(FedOptState, learning-rate state)`.

  Raises:
    ValueError: a hyperparameter outside its range.
  """
  return optax.chain(scale_by_fed_adam(b1, b2, tau), optax.scale_by_learning_rate(learning_rate))


def fed_yogi(learning_rate: optax.ScalarOrSchedule, b1: float = 0.9, b2: float = 0.99,
             tau: float = 1e-3) -> optax.GradientTransformation:
  """The server step of FedYogi exactly as in Reddi et al. 2021, Algorithm 2.

  Unlike `optax.yogi`: no bias correction, `m` starts at 0 and `v` at `tau^2`
  (optax: both at 1e-6 whatever its eps), and the defaults are the paper's.

  Args:
    learning_rate: the server learning rate eta (a float or an optax schedule
      of the round).
    b1: momentum of the average client delta, in [0, 1).
    b2: rate of Yogi's additive second-moment update, in [0, 1).
    tau: adaptivity, > 0: added to `sqrt(v_t)`, and `v_{-1} = tau^2`.

  Returns:
    An optax transform to be given the pseudo-gradient `-Delta_t` (as
    `fedavg` does); its updates move the model by `eta * m_t / (sqrt(v_t) +
    tau)`. Its state is `(FedOptState, learning-rate state)`.

  Raises:
    ValueError: a hyperparameter outside its range.
  """
  return optax.chain(scale_by_fed_yogi(b1, b2, tau), optax.scale_by_learning_rate(learning_rate))


def fed_adagrad(learning_rate: optax.ScalarOrSchedule, b1: float = 0.0,
                tau: float = 1e-3) -> optax.GradientTransformation:
  """The server step of FedAdagrad exactly as in Reddi et al. 2021, Algorithm 2.

  Unlike `optax.adagrad`: `tau` is added outside the square root, and `v`
  starts at `tau^2` (optax: eps inside the root, accumulator from 0.1).

  Args:
    learning_rate: the server learning rate eta (a float or an optax schedule
      of the round).
    b1: momentum of the average client delta, in [0, 1). Algorithm 2 allows
      it; the paper runs FedAdagrad with 0, the default.
    tau: adaptivity, > 0: added to `sqrt(v_t)`, and `v_{-1} = tau^2`.

  Returns:
    An optax transform to be given the pseudo-gradient `-Delta_t` (as
    `fedavg` does); its updates move the model by `eta * m_t / (sqrt(v_t) +
    tau)`. Its state is `(FedOptState, learning-rate state)`.

  Raises:
    ValueError: a hyperparameter outside its range.
  """
  return optax.chain(scale_by_fed_adagrad(b1, tau), optax.scale_by_learning_rate(learning_rate))


def fedadam(model: Model, client_optimizer: optax.GradientTransformation, local: LocalConfig,
            server_learning_rate: optax.ScalarOrSchedule, *, b1: float = 0.9, b2: float = 0.99,
            tau: float = 1e-3, weighting: str = "examples") -> Algorithm:
  """FedAdam: FedAvg clients, `fed_adam(server_learning_rate, b1, b2, tau)` on the server.

  For `optax.adam` on the server instead, use `fedavg(model, client_optimizer,
  optax.adam(...), local)`.
  """
  return fedavg(model, client_optimizer, fed_adam(server_learning_rate, b1, b2, tau), local,
                weighting)


def fedyogi(model: Model, client_optimizer: optax.GradientTransformation, local: LocalConfig,
            server_learning_rate: optax.ScalarOrSchedule, *, b1: float = 0.9, b2: float = 0.99,
            tau: float = 1e-3, weighting: str = "examples") -> Algorithm:
  """FedYogi: FedAvg clients, `fed_yogi(server_learning_rate, b1, b2, tau)` on the server.

  For `optax.yogi` on the server instead, use `fedavg(model, client_optimizer,
  optax.yogi(...), local)`.
  """
  return fedavg(model, client_optimizer, fed_yogi(server_learning_rate, b1, b2, tau), local,
                weighting)


def fedadagrad(model: Model, client_optimizer: optax.GradientTransformation, local: LocalConfig,
               server_learning_rate: optax.ScalarOrSchedule, *, b1: float = 0.0,
               tau: float = 1e-3, weighting: str = "examples") -> Algorithm:
  """FedAdagrad: FedAvg clients, `fed_adagrad(server_learning_rate, b1, tau)` on the server.

  For `optax.adagrad` on the server instead, use `fedavg(model, client_optimizer,
  optax.adagrad(...), local)`.
  """
  return fedavg(model, client_optimizer, fed_adagrad(server_learning_rate, b1, tau), local,
                weighting)


# -- registered as algorithm.name = fedadam | fedyogi | fedadagrad ----------------------


_STEPS = {"fed_adam": fed_adam, "fed_yogi": fed_yogi, "fed_adagrad": fed_adagrad}
_TWIN = {"fed_adam": "adam", "fed_yogi": "yogi", "fed_adagrad": "adagrad"}


@dataclasses.dataclass(frozen=True, kw_only=True)
class FedAdamConfig(AlgorithmSection):
  """FedAdam (Reddi et al. 2021, Algorithm 2): FedAvg clients, the paper's server step.

  `server_optimizer` takes learning_rate, b1 and b2 (FedAdagrad: b1); its
  name is implied (`fed_adam`, not optax.adam); tau is `tau`.
  """

  step: ClassVar[str] = "fed_adam"
  accepted: ClassVar[tuple[str, ...]] = ("b1", "b2")
  server_optimizer: OptimizerConfig = option(default_factory=server_sgd)
  tau: float = option(1e-3, check=(positive, "must be > 0"),
                      help="adaptivity tau of Reddi et al. 2021: the server step is "
                           "eta * m / (sqrt(v) + tau), v starts at tau^2")
  weighting: Literal["examples", "uniform"] = "examples"

  def __post_init__(self):
    super().__post_init__()
    so, implied, twin = self.server_optimizer, self.step, _TWIN[self.step]
    name = ALGORITHMS.name_of(self)
    plain = (f"For plain optax.{twin} (a different step) use algorithm.name = 'fedavg' with "
             f"algorithm.server_optimizer.name = {twin!r}.")
    if so.name not in ("sgd", implied):  # sgd: the optimizer section's default, no name given
      raise ConfigError(f"algorithm.server_optimizer.name = {so.name!r} conflicts with "
                        f"algorithm.name = {name!r}, whose server optimizer is {implied}, the "
                        f"paper-exact step of Reddi et al. 2021 (not optax.{twin}); leave the "
                        f"name out (learning_rate, {', '.join(self.accepted)} are used). {plain}")
    for key, value in so.kwargs.items():
      where = f"algorithm.server_optimizer.{key}"
      if key in ("eps", "epsilon", "tau"):
        raise ConfigError(f"{where}: the adaptivity of {name} is algorithm.tau; set "
                          "algorithm.tau instead.")
      if key not in self.accepted:
        raise ConfigError(f"Unknown config key {where!r} for algorithm.name = {name!r}: its "
                          f"server optimizer {implied} (Reddi et al. 2021, Algorithm 2) accepts "
                          f"learning_rate, {', '.join(self.accepted)} (tau is algorithm.tau). "
                          f"{plain}")
      if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1:
        raise ConfigError(f"{where} = {value!r} must be a number in [0, 1).")
    object.__setattr__(self, "server_optimizer", dataclasses.replace(so, name=implied))

  def server_step(self) -> optax.GradientTransformation:
    """The paper-exact server optimizer of this section."""
    so = self.server_optimizer
    try:
      return _STEPS[self.step](so.learning_rate, **so.kwargs, tau=self.tau)
    except ValueError as e:
      raise ConfigError(f"algorithm.server_optimizer: {e}") from e


@dataclasses.dataclass(frozen=True, kw_only=True)
class FedYogiConfig(FedAdamConfig):
  """FedYogi (Reddi et al. 2021, Algorithm 2)."""

  step: ClassVar[str] = "fed_yogi"


@dataclasses.dataclass(frozen=True, kw_only=True)
class FedAdagradConfig(FedAdamConfig):
  """FedAdagrad (Reddi et al. 2021, Algorithm 2; b1 = 0 by default, as the paper runs it)."""

  step: ClassVar[str] = "fed_adagrad"
  accepted: ClassVar[tuple[str, ...]] = ("b1",)


def _build(cfg: FedAdamConfig, ctx) -> Algorithm:
  """FedAvg clients with the paper-exact adaptive server step."""
  client, _ = optimizers(cfg, server=False)
  return fedavg(ctx.model, client, cfg.server_step(), cfg.local_config(ctx.local_dp),
                cfg.weighting)


for _name, _cls in (("fedadam", FedAdamConfig), ("fedyogi", FedYogiConfig),
                    ("fedadagrad", FedAdagradConfig)):
  ALGORITHMS.register(_name, _cls, weighting=weighting_of, message="model_delta")(_build)
