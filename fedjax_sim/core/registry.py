"""The component registry: every algorithm, dataset, model, sampling scheme,
compressor and privacy mechanism is registered here by the file that defines it.

A component is a name, its own typed config dataclass (a subclass of its
family's base section, validated by `fedjax_sim.core.schema`), a factory
`build(config, context) -> object`, the rules it imposes on the rest of a
run's config (`checks`), and traits other components' rules may read. A
run's config section picks a component by its family's selector key
(`algorithm.name`, `data.kind`, `model.kind`, `sampling.scheme`,
`privacy.mechanism`, `compression.method`) and is validated against that
component's own dataclass only, so a key another component uses is an error
that names the component it belongs to.

Adding a component is one file:

    @dataclasses.dataclass(frozen=True, kw_only=True)
    class MyAlgorithmConfig(AlgorithmSection):
      beta: float = option(0.5, check=(positive, "must be > 0"))

    @ALGORITHMS.register("my_algorithm", MyAlgorithmConfig, weighting="examples")
    def _build(cfg, ctx):
      return my_algorithm(ctx.model, ..., cfg.beta)

and it is reachable from YAML (`algorithm: {name: my_algorithm, beta: 0.3}`)
once its module is imported (a config's top-level `imports:` list names
modules to import first).

The registry is filled at import time only; nothing is recorded while
tracing.
"""

from __future__ import annotations

import dataclasses
import difflib
from typing import Any, Callable, Mapping

from fedjax_sim.core.algorithm import LocalConfig
from fedjax_sim.core.schema import (SECTION_PARSERS, ConfigError, OptimizerConfig, build_optimizer,
                                    fraction_open, option, parse_section, positive,
                                    unknown_key_error)


@dataclasses.dataclass(frozen=True)
class Component:
  """One registered component.

  Attributes:
    family: the family's section name ("algorithm", "data", ...).
    name: the selector value that picks it.
    config: its config dataclass (a subclass of the family's base section).
    build: `build(config, context) -> object`; what `context` carries is
      the family's contract (see `Family`).
    checks: `check(run_config) -> None`, raising `ConfigError`: the rules
      this component imposes on the rest of the run's config.
    traits: facts other components' rules read (e.g. an algorithm's
      `weighting(config) -> "uniform" | "examples"`, its `message`), and
      `example`: what the contract suite runs the component with: config
      sections that make a small run valid (families with config sections
      around them), or for a model `{"input_shape": ...}`, the per-example
      input it takes.
  """

  family: str
  name: str
  config: type
  build: Callable[[Any, Any], Any]
  checks: tuple[Callable[[Any], None], ...] = ()
  traits: Mapping[str, Any] = dataclasses.field(default_factory=dict)

  @property
  def doc(self) -> str:
    """One line: the config class's docstring, else the factory's."""
    own = self.config.__doc__ or ""
    if own.startswith(self.config.__name__ + "("):  # dataclass's generated signature
      own = ""
    return (own or self.build.__doc__ or "").strip().split("\n")[0]


class Family:
  """The components of one kind, picked by one selector key of one config section.

  Args:
    section: the config section ("algorithm").
    selector: its key naming the component ("name").
    base: the base dataclass every component config of this family extends.
    default: the component a config without the section gets.
    contract: what `build(config, context)` receives and returns.
  """

  def __init__(self, section: str, selector: str, base: type, default: str, contract: str):
    self.section, self.selector, self.base, self.default = section, selector, base, default
    self.contract = contract
    self._components: dict[str, Component] = {}
    self._by_type: dict[type, Component] = {}
    SECTION_PARSERS[base] = self.parse

  def register(self, name: str, config: type | None = None, *,
               checks: tuple[Callable[[Any], None], ...] = (), replace: bool = False,
               **traits) -> Callable:
    """Decorator: registers `build(config, context)` under `name`.

    `config` defaults to the family's base section (a component without
    settings of its own). `replace=True` lets a user's module override a
    component of the same name; otherwise a second registration is an error.
    """
    config = self.base if config is None else config
    if config is self.base and name != self.default:
      raise TypeError(f"{self.section} component {name!r}: give it its own config dataclass "
                      f"(a subclass of {self.base.__name__}, empty if it has no settings); only "
                      f"the default {self.default!r} uses the base section itself.")
    if not (isinstance(config, type) and issubclass(config, self.base)
            and dataclasses.is_dataclass(config)):
      raise TypeError(f"{self.section} component {name!r}: its config must be a dataclass "
                      f"extending {self.base.__name__}; got {config!r}.")

    def decorator(build):
      if name in self._components and not replace:
        raise ValueError(f"{self.section}.{self.selector} = {name!r} is registered already (by "
                         f"{self._components[name].build.__module__}); pass replace=True to "
                         "override it.")
      if config in self._by_type and self._by_type[config].name != name:
        raise TypeError(f"{config.__name__} is the config of {self._by_type[config].name!r}; "
                        f"give {name!r} its own dataclass (a subclass will do).")
      component = Component(self.section, name, config, build, tuple(checks), dict(traits))
      self._components[name] = component
      self._by_type[config] = component
      return build

    return decorator

  def names(self) -> list[str]:
    return sorted(self._components)

  def __contains__(self, name: str) -> bool:
    return name in self._components

  def get(self, name: str, path: str | None = None) -> Component:
    """The component registered as `name`; a `ConfigError` with the close names otherwise."""
    if name in self._components:
      return self._components[name]
    where = path or f"{self.section}.{self.selector}"
    close = difflib.get_close_matches(str(name), self.names(), n=1)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    raise ConfigError(f"{where}: {name!r} is not a registered {self.section} "
                      f"{self.selector}.{hint} Use one of {', '.join(map(repr, self.names()))} "
                      f"(a module that registers another must be listed in the config's "
                      f"top-level `imports`).")

  def of(self, config) -> Component:
    """The component a parsed config section belongs to."""
    return self.get(getattr(config, self.selector))

  def trait(self, config, name: str, default=None):
    """A trait of the component a config section belongs to; a callable trait is
    called with the section (e.g. an algorithm's `weighting(cfg)`)."""
    value = self.of(config).traits.get(name, default)
    return value(config) if callable(value) else value

  def name_of(self, config) -> str:
    comp = self._by_type.get(type(config))
    if comp is None:
      raise ConfigError(f"{type(config).__name__} is not the config of a registered {self.section} "
                        "component; register it first.")
    return comp.name

  def selected(self, raw: dict):
    """The component name a raw section selects: its selector, else the component
    implied by a key only it has (trait `implied_by`, e.g. `factory`), else the default."""
    name = raw.get(self.selector)
    if name is None:
      implied = [n for n, c in self._components.items() if c.traits.get("implied_by") in raw]
      name = implied[0] if len(implied) == 1 else self.default
    return name

  def parse(self, raw: dict, path: str):
    """Validates a raw section against the dataclass of the component it selects."""
    raw = dict(raw)
    name = self.selected(raw)
    raw.pop(self.selector, None)
    if not isinstance(name, str):
      raise ConfigError(f"{path}.{self.selector}: expected a string, got {name!r}.")
    comp = self.get(name, f"{path}.{self.selector}")

    def unknown(key):
      users = [n for n, c in self._components.items()
               if key in {f.name for f in dataclasses.fields(c.config)}]
      if users:
        return ConfigError(
            f"{path}.{key} is set but {path}.{self.selector} = {name!r} ignores it (it applies "
            f"only to {path}.{self.selector} = {', '.join(map(repr, sorted(users)))}); remove "
            f"it, or choose the {self.selector} it belongs to.")
      allowed = [f.name for f in dataclasses.fields(comp.config)] + [self.selector]
      if difflib.get_close_matches(key, allowed, n=1):
        return unknown_key_error(key, allowed, path, f" for {path}.{self.selector} = {name!r}")
      others = {f.name: n for n, c in sorted(self._components.items(), reverse=True)
                for f in dataclasses.fields(c.config)}
      close = difflib.get_close_matches(key, list(others), n=1)
      hint = (f" Did you mean {close[0]!r}? (a key of {path}.{self.selector} = "
              f"{others[close[0]]!r})" if close else "")
      return ConfigError(f"Unknown config key {path + '.' + key!r} for {path}.{self.selector} = "
                         f"{name!r}.{hint} Allowed keys in {path}: {', '.join(sorted(allowed))}.")

    return parse_section(comp.config, raw, path, unknown=unknown)

  def default_config(self):
    return self.parse({self.selector: self.default}, self.section)


class _Selected:
  """Base-section mixin: the selector value is the registered name of the config's type."""

  _family: Family | None = None

  def _selected(self) -> str:
    return type(self)._family.name_of(self)


# -- the families and their base sections ------------------------------------------


@dataclasses.dataclass(frozen=True, kw_only=True)
class AlgorithmSection(_Selected):
  """Keys every algorithm has: how a client trains locally."""

  client_optimizer: OptimizerConfig = option(default_factory=OptimizerConfig)
  batch_size: int = option(8, check=(positive, "must be >= 1"))
  local_epochs: int = option(1, check=(positive, "must be >= 1"))
  shuffle: bool = True

  def __post_init__(self):
    build_optimizer(self.client_optimizer, "algorithm.client_optimizer")

  @property
  def name(self) -> str:
    return self._selected()

  def local_config(self, local_dp: tuple[float, float] | None = None) -> LocalConfig:
    """The `LocalConfig` of this section, with local DP-SGD `(clip, noise)` if given."""
    return LocalConfig(self.batch_size, self.local_epochs, self.shuffle,
                       *(local_dp if local_dp else (None, 0.0)))


@dataclasses.dataclass(frozen=True, kw_only=True)
class DataSection(_Selected):
  """Keys every dataset has: the evaluation split and the number of classes."""

  num_classes: int = option(10, check=(lambda x: x >= 2, "must be >= 2"))
  test_fraction: float = option(0.2, check=(fraction_open, "must be in (0, 1)"))
  holdout_clients: float = option(0.0, check=(lambda x: 0 <= x < 1, "must be in [0, 1)"),
                                  help="fraction of clients never trained on; 0 = per-client split")

  @property
  def kind(self) -> str:
    return self._selected()

  def population(self) -> int | None:
    """Clients the dataset will have, if known before loading (None: read from the data)."""
    return getattr(self, "num_clients", None)


@dataclasses.dataclass(frozen=True, kw_only=True)
class ModelSection(_Selected):
  """A model (its own keys are its architecture)."""

  @property
  def kind(self) -> str:
    return self._selected()


@dataclasses.dataclass(frozen=True, kw_only=True)
class SamplingSection(_Selected):
  """How each round's cohort is drawn."""

  @property
  def scheme(self) -> str:
    return self._selected()


@dataclasses.dataclass(frozen=True, kw_only=True)
class PrivacySection(_Selected):
  """Differential privacy (none by default)."""

  @property
  def mechanism(self) -> str:
    return self._selected()


@dataclasses.dataclass(frozen=True, kw_only=True)
class CompressionSection(_Selected):
  """Compressed uploads (float32 by default)."""

  @property
  def method(self) -> str:
    return self._selected()


ALGORITHMS = Family("algorithm", "name", AlgorithmSection, "fedavg",
                    "build(cfg, ctx) -> core.Algorithm; ctx has model, train (FederatedData), "
                    "local_dp ((clip, noise) or None)")
DATASETS = Family("data", "kind", DataSection, "gaussian_mixture",
                  "build(cfg, ctx) -> core.FederatedData (the whole population, split by "
                  "test_fraction / holdout_clients) or (train, test) (its own split); ctx has "
                  "seed")
MODELS = Family("model", "kind", ModelSection, "mlp",
                "build(cfg, ctx) -> core.Model; ctx has train (FederatedData), num_classes")
SAMPLERS = Family("sampling", "scheme", SamplingSection, "uniform",
                  "build(cfg, ctx) -> sampler(round) -> sorted ids; ctx has seed, train")
PRIVACY = Family("privacy", "mechanism", PrivacySection, "none",
                 "build(cfg, ctx) -> privacy plan or None; ctx has config, train, compressor, "
                 "noise_multiplier (a resumed run's)")
COMPRESSION = Family("compression", "method", CompressionSection, "none",
                     "build(cfg, ctx) -> Compressor, Aggregator (replaces the mean) or None")

for _family in (ALGORITHMS, DATASETS, MODELS, SAMPLERS, PRIVACY, COMPRESSION):
  _family.base._family = _family

FAMILIES = {f.section: f for f in (ALGORITHMS, DATASETS, MODELS, SAMPLERS, PRIVACY, COMPRESSION)}


@dataclasses.dataclass
class Context:
  """What factories receive besides their own config (each family uses a part)."""

  seed: int = 0
  config: Any = None  # the whole run config, for components that read other sections
  train: Any = None  # the training population (FederatedData)
  model: Any = None
  num_classes: int | None = None
  local_dp: tuple[float, float] | None = None
  compressor: Any = None
  noise_multiplier: float | None = None


def run_checks(config) -> None:
  """Runs every rule the config's chosen components declare."""
  for family in FAMILIES.values():
    section = getattr(config, family.section, None)
    if section is None:
      continue
    for check in family.of(section).checks:
      check(config)


__all__ = ["ALGORITHMS", "AlgorithmSection", "COMPRESSION", "CompressionSection", "Component",
           "Context", "DATASETS", "DataSection", "FAMILIES", "Family", "MODELS", "ModelSection",
           "PRIVACY", "PrivacySection", "SAMPLERS", "SamplingSection", "run_checks"]
