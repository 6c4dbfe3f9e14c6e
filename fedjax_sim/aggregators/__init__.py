"""Pure-functional aggregation stages implementing `core.aggregation.Aggregator`."""

from fedjax_sim.aggregators.mean import weighted_mean

__all__ = ["weighted_mean"]
