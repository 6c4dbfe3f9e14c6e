"""Federated algorithms, one file each, as factories returning `core.Algorithm`."""

from fedjax_sim.algorithms.fedavg import ServerState, fedavg, fedavgm

__all__ = ["ServerState", "fedavg", "fedavgm"]
