"""Federated datasets: synthetic generators and partitioners of centralized data."""

from fedjax_sim.datasets.gaussian_mixture import GaussianMixtureConfig, gaussian_mixture, lognormal_sizes
from fedjax_sim.datasets.fedjax_sqlite import (FedJaxSqliteConfig, load_fedjax_sqlite,
                                               read_fedjax_sqlite)
from fedjax_sim.datasets.leaf import LeafConfig, load_leaf_split, read_leaf_split
from fedjax_sim.datasets.npz import NpzConfig, read_npz
from fedjax_sim.datasets.packed import PackedConfig
from fedjax_sim.datasets.partition import dirichlet_partition, iid_partition, shards_partition
from fedjax_sim.datasets.tff_sqlite import TffSqliteConfig, load_tff_sqlite
from fedjax_sim.datasets.synthetic import LeafSyntheticConfig, SyntheticParams, leaf_synthetic

__all__ = [
    "FedJaxSqliteConfig",
    "LeafConfig",
    "load_leaf_split",
    "read_leaf_split",
    "load_fedjax_sqlite",
    "read_fedjax_sqlite",
    "GaussianMixtureConfig",
    "LeafSyntheticConfig",
    "NpzConfig",
    "PackedConfig",
    "SyntheticParams",
    "TffSqliteConfig",
    "dirichlet_partition",
    "gaussian_mixture",
    "iid_partition",
    "leaf_synthetic",
    "load_tff_sqlite",
    "lognormal_sizes",
    "read_npz",
    "shards_partition",
]
