"""torch's time-first transformer layers, run batch-first inside.

``nn.TransformerEncoderLayer`` and ``nn.TransformerDecoderLayer`` are time-first by default
(``batch_first=False``): their linear and norm layers then see ``(T, B, E)``, whose first
dimension is not the sample, and no per-sample rule, Opacus grad sampler or cohort probe
can read it. The layers here take and return ``(T, B, E)`` as before, and run the same
computation on ``(B, T, E)`` inside, with the same modules, weights and state_dict keys.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn


class BatchFirstEncoderLayer(nn.TransformerEncoderLayer):
    """A time-first ``nn.TransformerEncoderLayer`` whose sublayers see the batch first."""

    def forward(
        self,
        src: Tensor,
        src_mask: Tensor | None = None,
        src_key_padding_mask: Tensor | None = None,
        is_causal: bool = False,
    ) -> Tensor:
        """The layer's output for ``src`` (T, B, E): (T, B, E)."""
        out = super().forward(src.transpose(0, 1), src_mask, src_key_padding_mask, is_causal)
        return out.transpose(0, 1)


class BatchFirstDecoderLayer(nn.TransformerDecoderLayer):
    """A time-first ``nn.TransformerDecoderLayer`` whose sublayers see the batch first."""

    def forward(
        self,
        tgt: Tensor,
        memory: Tensor,
        tgt_mask: Tensor | None = None,
        memory_mask: Tensor | None = None,
        tgt_key_padding_mask: Tensor | None = None,
        memory_key_padding_mask: Tensor | None = None,
        tgt_is_causal: bool = False,
        memory_is_causal: bool = False,
    ) -> Tensor:
        """The layer's output for ``tgt`` (T, B, E) over ``memory`` (S, B, E): (T, B, E)."""
        out = super().forward(
            tgt.transpose(0, 1), memory.transpose(0, 1), tgt_mask, memory_mask,
            tgt_key_padding_mask, memory_key_padding_mask, tgt_is_causal, memory_is_causal,
        )  # fmt: skip
        return out.transpose(0, 1)


BATCH_FIRST: dict[type[nn.Module], type[nn.Module]] = {
    nn.TransformerEncoderLayer: BatchFirstEncoderLayer,
    nn.TransformerDecoderLayer: BatchFirstDecoderLayer,
}


def batch_first_inside(model: nn.Module) -> nn.Module:
    """``model`` with its time-first encoder and decoder layers run batch-first inside.

    In place; returns ``model``. Only torch's own classes are changed (a subclass's
    forward may differ), and only time-first ones (:func:`time_first_layers`).
    """
    for layer in time_first_layers(model):
        # the class alone changes: torch keeps no record of the constructor's arguments
        # (activation, norm_first, ...) to build a new layer from, and the modules,
        # weights, hooks and mode stay the ones the model has
        layer.__class__ = BATCH_FIRST[type(layer)]
        for attention in _attentions(layer):
            attention.batch_first = True
    return model


def time_first_layers(model: nn.Module) -> list[nn.Module]:
    """The encoder and decoder layers of torch in ``model`` that run time-first."""
    return [
        layer
        for layer in model.modules()
        if type(layer) in BATCH_FIRST and not _attentions(layer)[0].batch_first
    ]


def _attentions(layer: nn.Module) -> list[Any]:
    """A layer's attention sublayers (torch's, or fedsim's drop-in): those with batch_first."""
    return [child for child in layer.children() if hasattr(child, "batch_first")]
