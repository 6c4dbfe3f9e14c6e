"""Federated datasets: synthetic generators, file loaders and partitioners of centralized data.

Importing this package registers every loader (`data.kind`); tensorflow-datasets
(`tfds`, `tff_sqlite`) and the optional Hugging Face `datasets` (`hf_disk`) are
imported only when such a dataset is loaded.
"""

from fedjax_sim.datasets.factory import FactoryConfig
from fedjax_sim.datasets.fedjax_sqlite import (FedJaxSqliteConfig, load_fedjax_sqlite,
                                               read_fedjax_sqlite)
from fedjax_sim.datasets.gaussian_mixture import (GaussianMixtureConfig, gaussian_mixture,
                                                  lognormal_sizes)
from fedjax_sim.datasets.hf_disk import HfDiskConfig, load_hf_split, read_hf_split
from fedjax_sim.datasets.leaf import LeafConfig, load_leaf_split, read_leaf_split
from fedjax_sim.datasets.npz import (NpzConfig, PartitionedSection, SplitArraysSection,
                                     partition_arrays, read_npz)
from fedjax_sim.datasets.packed import PackedConfig
from fedjax_sim.datasets.partition import (dirichlet_partition, iid_partition, pachinko_partition,
                                           quantity_skew_partition, shards_partition)
from fedjax_sim.datasets.synthetic import LeafSyntheticConfig, SyntheticParams, leaf_synthetic
from fedjax_sim.datasets.tfds_dir import TfdsConfig, load_tfds_split, read_tfds_split
from fedjax_sim.datasets.tff_sqlite import TffSqliteConfig, load_tff_sqlite

__all__ = [
    "FactoryConfig",
    "FedJaxSqliteConfig",
    "HfDiskConfig",
    "LeafConfig",
    "load_leaf_split",
    "read_leaf_split",
    "load_fedjax_sqlite",
    "read_fedjax_sqlite",
    "load_hf_split",
    "load_tfds_split",
    "GaussianMixtureConfig",
    "LeafSyntheticConfig",
    "NpzConfig",
    "PackedConfig",
    "PartitionedSection",
    "SplitArraysSection",
    "SyntheticParams",
    "TfdsConfig",
    "TffSqliteConfig",
    "dirichlet_partition",
    "gaussian_mixture",
    "iid_partition",
    "leaf_synthetic",
    "load_tff_sqlite",
    "lognormal_sizes",
    "pachinko_partition",
    "partition_arrays",
    "quantity_skew_partition",
    "read_hf_split",
    "read_npz",
    "read_tfds_split",
    "shards_partition",
]
