"""Federated datasets: synthetic generators and partitioners of centralized data."""

from fedjax_sim.datasets.gaussian_mixture import gaussian_mixture, lognormal_sizes
from fedjax_sim.datasets.partition import dirichlet_partition, iid_partition, shards_partition
from fedjax_sim.datasets.synthetic import SyntheticParams, leaf_synthetic

__all__ = [
    "SyntheticParams",
    "dirichlet_partition",
    "gaussian_mixture",
    "iid_partition",
    "leaf_synthetic",
    "lognormal_sizes",
    "shards_partition",
]
