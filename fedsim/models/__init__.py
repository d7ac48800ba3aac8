"""Models: the built-in CNNs, LSTM and Transformer, and how any model is built and scored."""

from fedsim.models.build import build_model, check_client_model, check_outputs, model_kwargs
from fedsim.models.evaluation import evaluate, run_device
from fedsim.models.sequence import lstm_layer, opacus_lstm_layer

__all__ = [
    "build_model",
    "check_client_model",
    "check_outputs",
    "evaluate",
    "lstm_layer",
    "model_kwargs",
    "opacus_lstm_layer",
    "run_device",
]
