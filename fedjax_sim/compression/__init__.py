"""Compressed uploads: quantizers, rotation, sparsifiers, sign, error feedback, exact bit counts.

A `Compressor` is a per-client lossy channel on the flattened update;
`compressed_mean(compressor, error_feedback=...)` and `majority_vote(step)`
are aggregation stages; DP-FedAvg's `gaussian_sum` takes a compressor to
compose clip -> compress -> noise.
"""

from fedjax_sim.compression.compressor import (CompressionError, Compressor, apply_to_tree,
                                               compressed_mean, majority_vote, num_params)
from fedjax_sim.compression.hadamard import fwht, next_power_of_two, rotate, unrotate
from fedjax_sim.compression.quantize import drive, qsgd, rotated, stochastic_quantizer
from fedjax_sim.compression.sparsify import random_k, scaled_sign, top_k

__all__ = ["CompressionError", "Compressor", "apply_to_tree", "compressed_mean", "drive", "fwht",
           "majority_vote", "next_power_of_two", "num_params", "qsgd", "random_k", "rotate",
           "rotated", "scaled_sign", "stochastic_quantizer", "top_k", "unrotate"]

from fedjax_sim.core.registry import COMPRESSION as _COMPRESSION

_COMPRESSION.register("none")(lambda cfg, ctx: None)  # float32 updates
