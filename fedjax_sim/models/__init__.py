"""Models as pure `(init, apply, loss, metrics)` records."""

from fedjax_sim.models.flax_models import cnn, logistic_regression, mlp, num_params

__all__ = ["cnn", "logistic_regression", "mlp", "num_params"]
