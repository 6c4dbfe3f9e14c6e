"""fedjax_sim: a JAX federated-learning simulator.

Client updates are vmapped over blocks of clients, blocks are streamed (a
`fori_loop` inside each compiled chunk, chunks from a host prefetch thread) so
memory stays bounded, and sharded over every local device.
"""

from fedjax_sim.aggregators import weighted_mean
from fedjax_sim.algorithms import fedavg, fedavgm
from fedjax_sim.core import (Aggregator, Algorithm, ClientData, ClientOutput, DataError, Engine,
                             EngineConfig, Evaluator, FederatedData, LocalConfig, Model, Planner,
                             RoundPlan, RoundResult, default_mesh, round_rng, sample_poisson,
                             sample_shuffled, sample_uniform)
from fedjax_sim.core.keys import Purpose, run_key
from fedjax_sim.models import cnn, logistic_regression, mlp

__version__ = "0.1.0"

__all__ = [
    "Aggregator", "Algorithm", "ClientData", "ClientOutput", "DataError", "Engine",
    "EngineConfig", "Evaluator", "FederatedData", "LocalConfig", "Model", "Planner", "RoundPlan",
    "Purpose", "RoundResult", "cnn", "default_mesh", "fedavg", "fedavgm", "logistic_regression", "mlp",
    "round_rng", "run_key", "sample_poisson", "sample_shuffled", "sample_uniform", "weighted_mean",
]
