"""Type aliases shared across the package."""

from typing import Any, Mapping

import jax
import numpy as np

Params = Any  # a pytree of arrays
PyTree = Any
PRNGKey = jax.Array  # a typed key from `jax.random.key`
Batch = Mapping[str, jax.Array]  # one array per feature, leading axis = examples
ClientIds = np.ndarray  # int64 client indices into a FederatedData
