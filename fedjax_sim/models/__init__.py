"""Models as pure `(init, apply, loss, metrics)` records."""

from fedjax_sim.models.flax_models import (CNNConfig, LogRegConfig, MLPConfig, cnn, flax_classifier,
                                           logistic_regression, mlp, num_params)

__all__ = ["CNNConfig", "LogRegConfig", "MLPConfig", "cnn", "flax_classifier",
           "logistic_regression", "mlp", "num_params"]
