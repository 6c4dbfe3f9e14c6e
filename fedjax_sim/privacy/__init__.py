"""Differential privacy: DP-FedAvg's clip-and-noise stage and its accounting (issue 4, in progress)."""

from fedjax_sim.privacy.gaussian_sum import gaussian_sum
from fedjax_sim.privacy.accounting import (PrivacyError, calibrate_noise_multiplier,
                                           dp_fedavg_event, epsilon, epsilons)

__all__ = ["gaussian_sum", "PrivacyError", "calibrate_noise_multiplier", "dp_fedavg_event", "epsilon",
           "epsilons"]
