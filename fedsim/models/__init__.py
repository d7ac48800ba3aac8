"""Models: the built-in CNNs, LSTM and Transformer, and how any model is built and scored."""

from fedsim.models.build import (
    build_model,
    check_client_model,
    check_outputs,
    clipping_path,
    model_kwargs,
)
from fedsim.models.evaluation import device_name, evaluate, run_device
from fedsim.models.sequence import lstm_layer, opacus_lstm_layer

__all__ = [
    "build_model",
    "check_client_model",
    "check_outputs",
    "clipping_path",
    "device_name",
    "evaluate",
    "lstm_layer",
    "model_kwargs",
    "opacus_lstm_layer",
    "run_device",
]
