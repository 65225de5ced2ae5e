"""Where a worker folds: ``cpu``, ``cuda``, ``cuda:N`` or ``auto``.

``check_device_name`` is syntax only (no torch import: ``workers.config`` calls it);
``resolve_device`` asks torch. Asking for CUDA where there is none is a configuration
error, reported as such; ``auto`` takes the first GPU when there is one and the CPU
otherwise, with a log line.
"""

from __future__ import annotations

import logging
import re
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

CPU = "cpu"
AUTO = "auto"
# Kept identical to the pattern of fedmq.settings' worker_device (a unit test checks it).
DEVICE_PATTERN = r"^(cpu|auto|cuda(:[0-9]+)?)$"
_DEVICE = re.compile(DEVICE_PATTERN)


class DeviceUnavailable(RuntimeError):
    """The configured device does not exist on this machine."""


def check_device_name(name: str) -> str:
    """``name`` lower-cased and stripped, or ValueError when it is not a device name."""
    spec = str(name).strip().lower()
    if not _DEVICE.match(spec):
        raise ValueError(f"worker device must be cpu, cuda, cuda:N or auto, got {name!r}")
    return spec


def resolve_device(name: str) -> torch.device:
    """The torch device ``name`` means on this machine; DeviceUnavailable for a CUDA
    device that is not there."""
    import torch

    spec = check_device_name(name)
    if spec == CPU:
        return torch.device("cpu")
    if spec == AUTO:
        if torch.cuda.is_available():
            return torch.device("cuda", torch.cuda.current_device())
        log.info("worker device 'auto': no CUDA device (%s); folding on the CPU", _torch_cuda())
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise DeviceUnavailable(
            f"worker device {name!r}: no CUDA device is available ({_torch_cuda()}); "
            "set FEDMQ_WORKER_DEVICE to 'cpu', or to 'auto' to use a GPU only when present"
        )
    device = torch.device(spec)
    if device.index is not None and device.index >= torch.cuda.device_count():
        raise DeviceUnavailable(
            f"worker device {name!r}: this machine has {torch.cuda.device_count()} CUDA "
            f"device(s), numbered from 0"
        )
    return device


def _torch_cuda() -> str:
    import torch

    built = torch.version.cuda
    return f"torch {torch.__version__}, " + (
        f"built with CUDA {built}" if built else "built without CUDA"
    )
