"""The masked input as an ordinary update blob: one uint32 tensor the size of the model's
float tensors together. Devices encode it, the ingest and the gateway check an upload
against ``masked_spec``, the worker decodes it; the codec's bounds hold unchanged."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from protocol.codec import TensorSpec

MASKED = "secagg.masked"


def float_size(spec: Mapping[str, TensorSpec]) -> int:
    """How many values the masks run over: every float tensor of the model."""
    return sum(
        int(np.prod(s.shape, dtype=np.int64)) for s in spec.values() if s.dtype.startswith("float")
    )


def masked_spec(model_spec: Mapping[str, TensorSpec]) -> dict[str, TensorSpec]:
    """What a masked update of a model of ``model_spec`` must hold, and nothing else."""
    return {MASKED: TensorSpec((float_size(model_spec),), "uint32")}
