"""The engine and its protocols; imports nothing else of the package."""

from fedjax_sim.core.aggregation import Aggregator, global_norm, tree_add
from fedjax_sim.core.algorithm import Algorithm, ClientData, ClientOutput, LocalConfig
from fedjax_sim.core.data import DataError, FederatedData
from fedjax_sim.core.engine import Engine, EngineConfig, RoundResult, SimState, default_mesh
from fedjax_sim.core.keys import Purpose, run_key
from fedjax_sim.core.local import local_train, masked_loss
from fedjax_sim.core.model import Model
from fedjax_sim.core.plan import Chunk, Planner, RoundPlan
from fedjax_sim.core.sampling import (round_rng, rounds_per_epoch, sample_poisson,
                                     sample_shuffled, sample_uniform)
from fedjax_sim.core.evaluation import Evaluator, summarize

__all__ = [
    "Aggregator", "Algorithm", "Chunk", "ClientData", "ClientOutput", "DataError", "Engine",
    "EngineConfig", "Evaluator", "FederatedData", "LocalConfig", "Model", "Planner", "Purpose", "RoundPlan",
    "RoundResult", "run_key", "SimState", "default_mesh", "global_norm", "local_train", "masked_loss",
    "round_rng", "rounds_per_epoch", "sample_poisson", "sample_shuffled", "sample_uniform",
    "summarize", "tree_add",
]
