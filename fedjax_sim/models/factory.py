"""A model from your own function: `model: {factory: "my_pkg.models:make_net", width: 64}`.

The section's `factory` key selects this component (no `kind` needed) and
names a callable as `"module:attribute"` (the attribute may be dotted,
`"pkg.mod:Class.create"`); every other key of the section is passed to it as
a keyword argument. `input_shape` (the training data's per-example `x` shape)
and `num_classes` are passed as well when the callable's signature names
them and the section does not set them.

The callable may return:

- a `fedjax_sim.Model`, used as is;
- a `flax.linen.Module` instance: a classifier (softmax cross-entropy,
  accuracy) via `flax_classifier`; if its `__call__` takes a `train` (or
  `training`) argument, it is set while training and the module's `dropout`
  RNG stream draws from the per-client, per-step key;
- for Flax NNX, a factory `rngs -> nnx.Module` (also wrapped as a
  classifier). A callable whose signature takes `rngs` (an NNX module class,
  say) is itself used as that factory, the other keys bound.

The module must be importable: on PYTHONPATH, or listed under the config's
top-level `imports:`.
"""

from __future__ import annotations

import dataclasses
import inspect
from typing import Callable

import flax.linen as nn

from fedjax_sim.core.model import Model
from fedjax_sim.core.registry import MODELS, ModelSection
from fedjax_sim.core.schema import ConfigError, is_reference, option, resolve_reference
from fedjax_sim.models.flax_models import flax_classifier

_WHERE = "model.factory"


@dataclasses.dataclass(frozen=True, kw_only=True)
class FactoryConfig(ModelSection):
  """A model from your own function: factory 'module:function', other keys its arguments."""

  extra_keys = "kwargs"

  factory: str = option("", check=(is_reference, "must be 'module:function' (e.g. "
                                   "'my_pkg.models:make_net')"))
  kwargs: dict = option(default_factory=dict, help="the other keys: the function's arguments")

  def __post_init__(self):
    if not self.factory:
      raise ConfigError(f"{_WHERE} is required when model.kind = 'factory': name your function "
                        "as 'module:function' (e.g. 'my_pkg.models:make_net').")
    if not is_reference(self.factory):
      raise ConfigError(f"{_WHERE} = {self.factory!r} must be 'module:function' (e.g. "
                        "'my_pkg.models:make_net').")


def resolve(ref: str) -> Callable:
  """The callable `"module:attribute"` names; a `ConfigError` says what is wrong otherwise."""
  return resolve_reference(ref, _WHERE, "my_pkg.models:make_net")


def _parameters(fn) -> dict[str, inspect.Parameter] | None:
  """The parameters `fn(...)` takes (a class's `__init__`'s, without `self`: a metaclass such
  as NNX's hides them behind `*args, **kwargs`); None when there is no signature."""
  try:
    if isinstance(fn, type):
      return dict(list(inspect.signature(fn.__init__).parameters.items())[1:])
    return dict(inspect.signature(fn).parameters)
  except (TypeError, ValueError):  # a builtin without a signature
    return None


def _check_arguments(ref: str, params: dict[str, inspect.Parameter], kwargs: dict) -> None:
  """A `ConfigError` unless `kwargs` fit `params` (all required ones given, no unknown one)."""
  kinds = inspect.Parameter
  accepted = [n for n, p in params.items() if p.kind not in (kinds.VAR_POSITIONAL,
                                                              kinds.VAR_KEYWORD)]
  try:
    inspect.Signature(list(params.values())).bind(**kwargs)
  except TypeError as e:
    raise ConfigError(f"{_WHERE} = {ref!r} does not accept the section's arguments "
                      f"{sorted(kwargs)}: {e}. It takes {', '.join(accepted) or 'nothing'}.") from e


def _named(params, name: str) -> bool:
  return params is not None and name in params and params[name].kind in (
      inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)


def _train_argument(module: nn.Module) -> str | None:
  params = _parameters(type(module).__call__) or {}
  return next((name for name in ("train", "training") if name in params), None)


def model_from_factory(ref: str, kwargs: dict, input_shape: tuple[int, ...] | None,
                       num_classes: int | None) -> Model:
  """Calls the function `ref` names with `kwargs` (plus `input_shape`/`num_classes` when it
  names them) and turns what it returns into a `Model`.

  Raises:
    ConfigError: naming `model.factory`, when the reference is malformed, the
      module does not import, the attribute is missing, the arguments do not
      fit the signature, the call raises `TypeError`, or it returns something
      that is not a `Model`, a linen Module or an NNX factory.
  """
  fn = resolve(ref)
  params = _parameters(fn)
  kwargs = dict(kwargs)
  for name, value in (("input_shape", input_shape), ("num_classes", num_classes)):
    if value is not None and name not in kwargs and _named(params, name):
      kwargs[name] = value
  nnx_class = _named(params, "rngs")
  if params is not None:
    _check_arguments(ref, params, {**kwargs, **({"rngs": None} if nnx_class else {})})
  if nnx_class:
    result = lambda rngs: fn(**kwargs, rngs=rngs)  # noqa: E731
  else:
    try:
      result = fn(**kwargs)
    except TypeError as e:
      raise ConfigError(f"{_WHERE} = {ref!r}: calling it with {sorted(kwargs)} raised "
                        f"TypeError: {e}") from e
  if isinstance(result, Model):
    return result
  if input_shape is None:
    raise ConfigError(f"{_WHERE} = {ref!r} returned a {type(result).__name__}; wrapping it as a "
                      "classifier needs features 'x' and 'y' in the data.")
  if isinstance(result, nn.Module):
    return flax_classifier(result, input_shape, train_argument=_train_argument(result))
  from flax import nnx
  if isinstance(result, nnx.Module):
    raise ConfigError(f"{_WHERE} = {ref!r} returned an nnx.Module instance, whose parameters "
                      "are fixed; take an `rngs` argument (the model then builds its parameters "
                      "from the run's key) or return a factory `lambda rngs: MyNet(..., "
                      "rngs=rngs)`.")
  if callable(result) and not isinstance(result, type):
    try:
      return flax_classifier(result, input_shape)
    except TypeError as e:
      raise ConfigError(f"{_WHERE} = {ref!r}: {e}") from e
  raise ConfigError(f"{_WHERE} = {ref!r} returned a {type(result).__name__}; it must return a "
                    "fedjax_sim Model, a flax.linen Module, or an NNX factory `rngs -> "
                    "nnx.Module`.")


@MODELS.register("factory", FactoryConfig, implied_by="factory", example={
    "config": {"factory": "fedjax_sim.models.flax_models:mlp", "hidden": [4]}})
def _build_factory(cfg, ctx) -> Model:
  """A model from your own function (model.factory: 'module:function')."""
  features = ctx.train.features if ctx.train is not None else {}
  input_shape = tuple(features["x"].shape[1:]) if "x" in features else None
  num_classes = int(ctx.num_classes) if ctx.num_classes is not None else None
  return model_from_factory(cfg.factory, cfg.kwargs, input_shape, num_classes)
