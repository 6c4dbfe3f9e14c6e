"""Models as pure `(init, apply, loss, metrics)` records.

Importing this package registers every built-in model kind: logreg, mlp,
cnn (`flax_models`), fedavg_cnn, emnist_cnn, resnet18_gn (`vision`),
char_lstm, word_lstm, transformer, so_tag_lr (`text`) and factory (`factory`:
a model from your own function).
"""

from fedjax_sim.models.factory import FactoryConfig, model_from_factory
from fedjax_sim.models.flax_models import (CNNConfig, LogRegConfig, MLPConfig, cnn, flax_classifier,
                                           logistic_regression, mlp, num_params)
from fedjax_sim.models.text import (CharLSTMConfig, SOTagLRConfig, TransformerConfig,
                                    WordLSTMConfig, bag_of_words, char_lstm, next_token_loss,
                                    next_token_metrics, so_tag_lr, transformer_lm, word_lstm)
from fedjax_sim.models.vision import (EmnistCNNConfig, FedAvgCNNConfig, ResNet18GNConfig,
                                      emnist_cnn, fedavg_cnn, resnet18_gn)

__all__ = ["CNNConfig", "CharLSTMConfig", "EmnistCNNConfig", "FactoryConfig", "FedAvgCNNConfig",
           "LogRegConfig", "MLPConfig", "ResNet18GNConfig", "SOTagLRConfig", "TransformerConfig",
           "WordLSTMConfig", "bag_of_words", "char_lstm", "cnn", "emnist_cnn", "fedavg_cnn",
           "flax_classifier", "logistic_regression", "mlp", "model_from_factory",
           "next_token_loss", "next_token_metrics", "num_params", "resnet18_gn", "so_tag_lr",
           "transformer_lm", "word_lstm"]
