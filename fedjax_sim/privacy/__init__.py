"""Differential privacy: accounting with Google's dp-accounting (mechanisms: issue 4, in progress)."""

from fedjax_sim.privacy.accounting import (PrivacyError, calibrate_noise_multiplier,
                                           dp_fedavg_event, epsilon, epsilons)

__all__ = ["PrivacyError", "calibrate_noise_multiplier", "dp_fedavg_event", "epsilon",
           "epsilons"]
