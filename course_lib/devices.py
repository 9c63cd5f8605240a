"""Where the course runs: one device resolver, and the one-line environment description."""

from __future__ import annotations

import os
import platform
import random

import torch

DEVICE_ENV_VAR = "COURSE_DEVICE"
THREADS_ENV_VAR = "COURSE_THREADS"


class DeviceUnavailableError(RuntimeError):
    """The requested device does not exist on this machine."""


def available_devices() -> list[str]:
    """Device types torch can use here, best first."""
    found = []
    if torch.cuda.is_available():
        found += [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        found.append("mps")
    return found + ["cpu"]


def get_device(preferred: str | torch.device | None = None) -> torch.device:
    """The device to run on: ``preferred``, else $COURSE_DEVICE, else cuda -> mps -> cpu."""
    choice = preferred if preferred is not None else os.environ.get(DEVICE_ENV_VAR) or None
    if choice is None:
        return torch.device(available_devices()[0].split(":")[0])
    try:
        device = torch.device(choice)
    except (RuntimeError, TypeError):
        raise DeviceUnavailableError(f"{choice!r} is not a device name; allowed: cpu, cuda, cuda:N, mps") from None
    names = available_devices()
    wanted = str(device) if device.index is not None else device.type
    if not any(n == wanted or n.split(":")[0] == wanted for n in names):
        source = "" if preferred is not None else f" (from ${DEVICE_ENV_VAR})"
        raise DeviceUnavailableError(
            f"device {str(choice)!r}{source} is not available on this machine; available: {', '.join(names)}"
        )
    return device


def model_device(model: torch.nn.Module) -> torch.device:
    """Where ``model`` lives: the device of its first parameter (or buffer); cpu for a model with neither."""
    for tensor in model.parameters():
        return tensor.device
    for tensor in model.buffers():
        return tensor.device
    return torch.device("cpu")


def to_model_device(model: torch.nn.Module, *tensors: torch.Tensor | None):
    """Inputs follow the model: move each tensor to ``model``'s device (``None`` stays ``None``).

    Every public course_lib function that takes token tensors calls this once, at the top (right after
    validating them where they arrived, so host tensors cost no device sync), so a model on cuda or mps works
    wherever a CPU model does; a function that only hands its tensors to another such function leaves the move
    to it. ``tests/test_device_rule.py`` checks every entry point. One tensor in, one out; several in, a tuple out.
    """
    device = model_device(model)
    moved = tuple(None if t is None else t.to(device) for t in tensors)
    return moved[0] if len(moved) == 1 else moved


def synchronize(device: str | torch.device) -> None:
    """Wait for queued kernels so that a timer measures the work, not the launch."""
    kind = torch.device(device).type
    if kind == "cuda":
        torch.cuda.synchronize(device)
    elif kind == "mps":
        torch.mps.synchronize()


def device_name(device: str | torch.device | None = None) -> str:
    """A human name of the device: the GPU model, or the CPU model."""
    dev = get_device(device)
    if dev.type == "cuda":
        return torch.cuda.get_device_name(dev)
    if dev.type == "mps":
        return "Apple GPU (mps)"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def describe_environment(device: str | torch.device | None = None) -> str:
    """One line for the top of every notebook: device, versions, threads."""
    import transformers

    dev = get_device(device)
    return (
        f"device: {dev} ({device_name(dev)}) | torch {torch.__version__} | transformers {transformers.__version__}"
        f" | python {platform.python_version()} | {torch.get_num_threads()} CPU threads"
    )


def apply_thread_setting() -> int | None:
    """Honour ``$COURSE_THREADS``: run torch's CPU work on that many threads (``None`` when unset).

    ``COURSE_THREADS=1`` (with ``OMP_NUM_THREADS=1``) makes float results independent of the machine's core
    count, which is how CI re-checks the stored notebook outputs on one thread.
    """
    value = os.environ.get(THREADS_ENV_VAR, "").strip()
    if not value:
        return None
    if not value.isdigit() or int(value) < 1:
        raise ValueError(f"${THREADS_ENV_VAR}={value!r} is not allowed; it must be a whole number >= 1 (or unset)")
    torch.set_num_threads(int(value))
    return int(value)


def seed_everything(seed: int = 0) -> int:
    """Seed Python, NumPy (if present) and torch (all devices) so generation repeats exactly."""
    random.seed(seed)
    try:
        import numpy as np

        np.random.seed(seed)
    except ImportError:
        pass
    torch.manual_seed(seed)
    return seed
