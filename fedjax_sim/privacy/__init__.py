"""Differential privacy: aggregation stages, local DP-SGD settings, and accounting.

- `gaussian_sum`: DP-FedAvg's clip -> sum -> Gaussian noise stage, with
  optional adaptive clipping.
- `tree_sum`: DP-FTRL's tree-aggregated noise stage.
- Local DP-SGD is a `LocalConfig` setting (`dp_clip_norm`,
  `dp_noise_multiplier`) honoured by every algorithm that trains with
  `core.local.local_train`.
- `accounting`: the mechanisms as dp-accounting events, epsilon, calibration
  and the `PrivacyLedger` a run's budget is enforced with; whatever an
  accountant raises reaches the caller as a `PrivacyError`.

Clipping (user-level and per-example) maps an update or gradient with a NaN
or infinite entry to zero and counts it (`nonfinite_updates`,
`nonfinite_examples`), so one diverged client cannot poison a noisy sum.
"""

from fedjax_sim.privacy.accounting import (PrivacyError, PrivacyLedger, TargetUnreachableError,
                                           adaptive_clip_noise, calibrate,
                                           calibrate_noise_multiplier, calibrate_worst,
                                           dp_fedavg_event, dp_ftrl_event, dp_sgd_event, epsilon,
                                           relation_for, tree_sizes)
from fedjax_sim.privacy.gaussian_sum import gaussian_sum
from fedjax_sim.privacy.tree import tree_sum
from fedjax_sim.privacy.mechanisms import (DPFedAvgConfig, DPFTRLConfig, LocalDPSGDConfig,
                                           PrivacyPlan, PrivacyUtilityWarning, plan_privacy,
                                           privacy_report)

__all__ = ["DPFTRLConfig", "DPFedAvgConfig", "LocalDPSGDConfig", "PrivacyPlan",
           "PrivacyUtilityWarning", "plan_privacy", "privacy_report", "PrivacyError", "PrivacyLedger", "TargetUnreachableError", "adaptive_clip_noise",
           "calibrate", "calibrate_noise_multiplier", "calibrate_worst", "dp_fedavg_event",
           "dp_ftrl_event", "dp_sgd_event", "epsilon", "gaussian_sum", "relation_for",
           "tree_sizes", "tree_sum"]
