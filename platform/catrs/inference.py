"""How a base classifier is run for noise sampling: the hot loop of certification.

Three modes, each giving the same logits as the plain eager model up to float tolerance (tested):

- `eager`: the model as it is.
- `channels_last`: a copy of the model with NHWC weights, fed NHWC inputs; oneDNN/cuDNN convolutions are
  faster in that layout.
- `compile`: `channels_last` plus `torch.compile`: faster still once compiled, after a compilation of several
  seconds per process and input shape on a cold cache (a second batch size switches to a dynamic-batch
  graph, so remainders cost one more compile, not one per size).

`channels_last` is the one default (`catrs.sampling.DEFAULT_INFERENCE`) of every certification: the CLI's, a
sweep's proxy, selection and final certification, and the teacher's votes. Most certifications catrs runs
are short and in new processes (a trial's proxy at each rung, a chunk worker's first chunk), where compiling
costs more than it saves; for one long certification of a large model (n = 100,000 over a test set),
`--inference compile` is worth its start-up. The measurements behind this choice are the README's Speed
section (`benchmarks/certify_throughput.py`, `benchmarks/inference_default.py`).
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
from torch import nn

from catrs.errors import UserError
from catrs.sampling import DEFAULT_INFERENCE, INFERENCE_MODES

Classifier = Callable[[torch.Tensor], torch.Tensor]


class _ChannelsLast(nn.Module):
    """Runs a channels-last copy of `model` on channels-last views of its 4-D inputs."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = copy.deepcopy(model).eval().to(memory_format=torch.channels_last)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        return self.model(x)


def prepare_for_inference(model: Classifier, mode: str = DEFAULT_INFERENCE) -> Classifier:
    """A callable with the logits of `model` in eval mode, run the `mode` way. An `nn.Module` is put in eval
    mode (the logits a smoothed classifier counts are the eval-mode network's); `channels_last` and `compile`
    then run a copy of it, so its later changes are not seen."""
    if mode not in INFERENCE_MODES:
        raise ValueError(f"unknown inference mode {mode!r}; choose one of: {', '.join(INFERENCE_MODES)}")
    if isinstance(model, nn.Module):
        model.eval()
    if mode == "eager":
        return model
    if not isinstance(model, nn.Module):
        raise ValueError(f"inference mode {mode!r} needs an nn.Module, got {type(model).__name__}")
    fast = _ChannelsLast(model)
    return torch.compile(fast) if mode == "compile" else fast


def model_device(model: Classifier) -> torch.device:
    """The device of the model's first parameter (CPU for a parameterless callable)."""
    if isinstance(model, nn.Module):
        for parameter in model.parameters():
            return parameter.device
    return torch.device("cpu")


def pick_device(requested: str | None = None) -> torch.device:
    """`requested` if given, else the first CUDA device when there is one, else the CPU."""
    if requested:
        return torch.device(requested)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def worker_device() -> torch.device:
    """The device of a Ray worker process: the GPU Ray gave it (which CUDA numbers 0 in the process, Ray having
    set CUDA_VISIBLE_DEVICES to it), or the CPU where the process sees no CUDA (a CPU worker, or a test
    cluster's node that only advertises a GPU)."""
    return torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")


def describe_device(device: torch.device) -> str:
    """What rows computed on `device` depend on: the kind of device (CUDA's normal sampler lays its numbers
    out by the GPU's multiprocessor count, so another GPU model draws other noise for the same index) and,
    on CUDA, whether convolutions and matmuls may use TF32."""
    if device.type == "cuda":
        tf32 = torch.backends.cudnn.allow_tf32 or torch.backends.cuda.matmul.allow_tf32
        return f"cuda {torch.cuda.get_device_name(device)}{' tf32' if tf32 else ''}"
    import platform

    return f"{device.type} {platform.machine()}"


def available_devices() -> list[str]:
    """The devices this process can run on."""
    found = ["cpu"] + [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    return found + (["mps"] if torch.backends.mps.is_available() else [])


def check_device(requested: str) -> str:
    """`requested` if this machine has it; else a `UserError` naming the devices it has."""
    try:
        device = torch.device(requested)
    except RuntimeError:
        raise UserError(
            f"--device {requested!r} is not a torch device; this machine has: {', '.join(available_devices())}"
        ) from None
    index = 0 if device.index is None else device.index
    present = {
        "cpu": True,
        "cuda": torch.cuda.is_available() and index < torch.cuda.device_count(),
        "mps": device.type == "mps" and torch.backends.mps.is_available(),
    }.get(device.type, False)
    if not present:
        raise UserError(
            f"--device {requested}: no such device here; this machine has: {', '.join(available_devices())}"
        )
    return requested


def check_precision(precision: str, device: torch.device) -> None:
    """Refuses a training precision `device` cannot run: fp16's loss scaling (`torch.amp.GradScaler`) is CUDA's."""
    if precision == "fp16" and device.type != "cuda":
        raise UserError(f"--precision fp16 trains on CUDA only; on {device} use bf16 or fp32")


def check_pass_fits(batch: int, input_dim: int, device: torch.device) -> None:
    """Refuses a forward pass whose noisy inputs alone (float32, and the channels-last copy) would not fit in
    the device's free memory: a clear error before any work, not an out-of-memory error in the middle."""
    needed = 2 * 4 * batch * input_dim
    if device.type == "cuda":
        free = torch.cuda.mem_get_info(device)[0]
    else:
        import psutil

        free = psutil.virtual_memory().available
    if needed > free:
        raise UserError(
            f"--batch {batch:,} needs {needed / 2**30:.1f} GiB for one pass's noisy inputs alone; {device} has "
            f"{free / 2**30:.1f} GiB free: lower --batch"
        )
