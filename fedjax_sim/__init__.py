"""fedjax_sim: a JAX federated-learning simulator.

Client updates are vmapped over blocks of clients, blocks are streamed (a
`fori_loop` inside each compiled chunk, chunks from a host prefetch thread) so
memory stays bounded, and sharded over every local device.

The public API is this namespace: configs and their components (every
algorithm, dataset, model, sampling scheme, compressor and privacy mechanism
has a typed config and a factory), `Simulation` (the CLI's run machinery from
a script), the registries to add your own components, and the building blocks
(`Engine`, `Algorithm`, `Aggregator`, ...) for custom loops.
"""

from fedjax_sim.aggregators import weighted_mean
from fedjax_sim.algorithms import (ditto, fed_adagrad, fed_adam, fed_yogi, fedadagrad, fedadam,
                                   fedavg, fedavgm, feddyn, fednova, fedprox, fedyogi, qffl,
                                   scaffold)
from fedjax_sim.algorithms.ditto import DittoConfig
from fedjax_sim.algorithms.fedavg import FedAvgConfig, FedAvgMConfig
from fedjax_sim.algorithms.feddyn import FedDynConfig
from fedjax_sim.algorithms.fednova import FedNovaConfig
from fedjax_sim.algorithms.fedopt import FedAdagradConfig, FedAdamConfig, FedYogiConfig
from fedjax_sim.algorithms.fedprox import FedProxConfig
from fedjax_sim.algorithms.qffl import QFFLConfig
from fedjax_sim.algorithms.scaffold import ScaffoldConfig
from fedjax_sim.compression import (Compressor, compressed_mean, drive, majority_vote, qsgd,
                                    random_k, rotated, scaled_sign, stochastic_quantizer, top_k)
from fedjax_sim.compression.quantize import ChannelConfig, DriveConfig, QSGDConfig, QuantizeConfig
from fedjax_sim.compression.sparsify import (MajorityVoteConfig, RandomKConfig, SignConfig,
                                             TopKConfig)
from fedjax_sim.core import (Aggregator, Algorithm, ClientData, ClientOutput, DataError, Engine,
                             EngineConfig, Evaluator, FederatedData, LocalConfig, Model,
                             RoundResult, local_train)
from fedjax_sim.core.keys import Purpose, run_key
from fedjax_sim.core.registry import (ALGORITHMS, COMPRESSION, DATASETS, MODELS, PRIVACY, SAMPLERS,
                                      AlgorithmSection, CompressionSection, Context, DataSection,
                                      ModelSection, PrivacySection, SamplingSection)
from fedjax_sim.core.sampling import (CohortConfig, DataProportionalConfig, PoissonConfig,
                                      ShuffleConfig, make_sampler, round_rng,
                                      sample_data_proportional, sample_poisson, sample_shuffled,
                                      sample_uniform)
from fedjax_sim.core.schema import ConfigError, OptimizerConfig, option
from fedjax_sim.datasets import (GaussianMixtureConfig, LeafSyntheticConfig, NpzConfig,
                                 PackedConfig, dirichlet_partition, gaussian_mixture,
                                 iid_partition, leaf_synthetic, lognormal_sizes, shards_partition)
from fedjax_sim.models import (CNNConfig, LogRegConfig, MLPConfig, cnn, flax_classifier,
                               logistic_regression, mlp)
from fedjax_sim.privacy import (DPFedAvgConfig, DPFTRLConfig, LocalDPSGDConfig, PrivacyError,
                                PrivacyPlan, gaussian_sum, plan_privacy, tree_sum)
from fedjax_sim.runner.config import CheckpointSection, Config, EngineSection, EvalConfig, \
    SystemSection, load_config
from fedjax_sim.runner.devices import use_cpu_devices
from fedjax_sim.runner.run import DivergenceError, Interrupted, RunError, run_experiment
from fedjax_sim.runner.simulation import Simulation, validate

__version__ = "0.1.0"

__all__ = [
    # running
    "Config", "Simulation", "load_config", "run_experiment", "use_cpu_devices", "validate",
    "CheckpointSection", "EngineSection", "EvalConfig", "SystemSection",
    "ConfigError", "DataError", "DivergenceError", "Interrupted", "PrivacyError", "RunError",
    # registries and their base sections (add your own components)
    "ALGORITHMS", "COMPRESSION", "DATASETS", "MODELS", "PRIVACY", "SAMPLERS", "Context",
    "AlgorithmSection", "CompressionSection", "DataSection", "ModelSection", "PrivacySection",
    "SamplingSection", "OptimizerConfig", "option",
    # algorithms
    "DittoConfig", "FedAdagradConfig", "FedAdamConfig", "FedAvgConfig", "FedAvgMConfig",
    "FedDynConfig", "FedNovaConfig", "FedProxConfig", "FedYogiConfig", "QFFLConfig",
    "ScaffoldConfig", "ditto", "fed_adagrad", "fed_adam", "fed_yogi", "fedadagrad", "fedadam",
    "fedavg", "fedavgm", "feddyn", "fednova", "fedprox", "fedyogi", "qffl", "scaffold",
    # aggregation stages, compression, privacy
    "weighted_mean", "compressed_mean", "majority_vote", "gaussian_sum", "tree_sum",
    "Compressor", "drive", "qsgd", "random_k", "rotated", "scaled_sign", "stochastic_quantizer",
    "top_k", "ChannelConfig", "DriveConfig", "MajorityVoteConfig", "QSGDConfig", "QuantizeConfig",
    "RandomKConfig", "SignConfig", "TopKConfig",
    "DPFTRLConfig", "DPFedAvgConfig", "LocalDPSGDConfig", "PrivacyPlan", "plan_privacy",
    # data and sampling
    "FederatedData", "GaussianMixtureConfig", "LeafSyntheticConfig", "NpzConfig", "PackedConfig",
    "dirichlet_partition", "gaussian_mixture", "iid_partition", "leaf_synthetic",
    "lognormal_sizes", "shards_partition", "CohortConfig", "DataProportionalConfig",
    "PoissonConfig", "ShuffleConfig", "make_sampler", "round_rng", "sample_data_proportional",
    "sample_poisson", "sample_shuffled", "sample_uniform",
    # models
    "CNNConfig", "LogRegConfig", "MLPConfig", "Model", "cnn", "flax_classifier",
    "logistic_regression", "mlp",
    # building blocks for custom algorithms, stages and loops
    "Aggregator", "Algorithm", "ClientData", "ClientOutput", "Engine", "EngineConfig",
    "Evaluator", "LocalConfig", "Purpose", "RoundResult", "local_train", "run_key",
]
