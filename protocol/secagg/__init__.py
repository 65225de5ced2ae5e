"""SecAgg+ (Bell et al. 2020, as Flower implements it): secure aggregation that survives
dropouts. Pure wire-level crypto, shared by devices (``DeviceSession``) and the aggregating
worker (``unmask_sum``); see each module for its part and README's threat model."""

from protocol.secagg.config import SecAggConfig
from protocol.secagg.device import SECRET_KEY, SELF_MASK, DeviceSession, share_point
from protocol.secagg.errors import SecAggError
from protocol.secagg.graph import neighbours
from protocol.secagg.prg import expand
from protocol.secagg.ring import (
    choose_scale,
    dequantize_mean,
    flatten,
    layout_of,
    quantize,
    unflatten,
)
from protocol.secagg.unmask import unmask_sum

__all__ = [
    "SECRET_KEY",
    "SELF_MASK",
    "DeviceSession",
    "SecAggConfig",
    "SecAggError",
    "choose_scale",
    "dequantize_mean",
    "expand",
    "flatten",
    "layout_of",
    "neighbours",
    "quantize",
    "share_point",
    "unflatten",
    "unmask_sum",
]
