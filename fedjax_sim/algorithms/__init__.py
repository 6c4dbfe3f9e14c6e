"""Federated algorithms, one file each, as factories returning `core.Algorithm`."""

from fedjax_sim.algorithms.ditto import ditto
from fedjax_sim.algorithms.fedavg import ServerState, fedavg, fedavgm
from fedjax_sim.algorithms.feddyn import FedDynState, feddyn
from fedjax_sim.algorithms.fednova import fednova
from fedjax_sim.algorithms.fedopt import (FedOptState, fed_adagrad, fed_adam, fed_yogi, fedadagrad,
                                          fedadam, fedyogi)
from fedjax_sim.algorithms.fedprox import fedprox, proximal_term
from fedjax_sim.algorithms.qffl import qffl
from fedjax_sim.algorithms.scaffold import ScaffoldState, scaffold

__all__ = [
    "FedDynState", "FedOptState", "ScaffoldState", "ServerState", "ditto", "fed_adagrad",
    "fed_adam", "fed_yogi", "fedadagrad", "fedadam", "fedavg", "fedavgm", "feddyn", "fednova",
    "fedprox", "fedyogi", "proximal_term", "qffl", "scaffold",
]
