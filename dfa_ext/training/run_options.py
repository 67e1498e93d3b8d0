"""Options every trainer shares (device, precision, seed, checkpoints) and what they resolve to."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from torch import nn

from ..config import option
from ..data.device_batches import DATA_ON_DEVICE_CHOICES
from ..errors import ConfigError

AMP_CHOICES = ("none", "bf16", "fp16")
COMPILE_CHOICES = ("off", "default", "max-autotune", "reduce-overhead")
NONFINITE_CHOICES = ("stop", "skip")


@dataclass
class RunOptions:
    """How a trainer runs, whatever it trains."""

    seed: int = option(0, "seed of initialisation, data order and augmentation")
    deterministic: bool = option(False, "deterministic kernels only (slower on GPUs)")
    device: str = option("auto", "cpu, cuda, cuda:N, or auto (cuda when available)")
    amp: str = option("none", "mixed precision: bf16 (CPU or GPU) or fp16 (GPU, with loss scaling)", choices=AMP_CHOICES)
    compile: str = option("off", "torch.compile the training step's forward and losses (the dfa:: ops stay single "
                          "graph nodes): default, max-autotune, or reduce-overhead (CUDA graphs on a GPU); "
                          "the first steps wait for the compiler", choices=COMPILE_CHOICES)
    channels_last: bool = option(True, "NHWC layout for images and conv weights (faster convolutions)")
    num_workers: int = option(0, "data-loading worker processes")
    data_on_device: str = option("auto", "keep an in-memory dataset (mnist, digits, cifar) on the training device and "
                                 "augment batches there: the same batches as the loader; auto: on a GPU",
                                 choices=DATA_ON_DEVICE_CHOICES)
    checkpoint_every: int = option(0, "also checkpoint every N steps (0: only at epoch or group ends)")
    resume: bool = option(True, "resume from OUT/last.pt when it exists")
    progress: bool = option(True, "show a progress bar")
    tensorboard: bool | None = option(None, "TensorBoard logs in OUT/tensorboard (default: when installed)")
    sync_bn: bool = option(False, "under several processes, BatchNorm statistics over the global batch (as one "
                           "process would compute them) instead of each process's share")
    on_nonfinite: str = option("stop", "on a NaN or infinite loss, gradient or beta: stop (the last checkpoint keeps "
                               "the last finite state) or skip the step's update", choices=NONFINITE_CHOICES)
    max_consecutive_skips: int = option(10, "stop after this many non-finite steps in a row (--on-nonfinite skip, "
                                        "and fp16 loss scaling, whose overflowing steps are skipped anyway)")

    def validate(self) -> None:
        if self.amp not in AMP_CHOICES:
            raise ConfigError(f"amp must be one of {AMP_CHOICES}, got {self.amp!r}")
        if self.compile not in COMPILE_CHOICES:
            raise ConfigError(f"compile must be one of {', '.join(COMPILE_CHOICES)}, got {self.compile!r}")
        if self.data_on_device not in DATA_ON_DEVICE_CHOICES:
            raise ConfigError(f"data_on_device must be one of {', '.join(DATA_ON_DEVICE_CHOICES)}, "
                              f"got {self.data_on_device!r}")
        if self.num_workers < 0 or self.checkpoint_every < 0:
            raise ConfigError("num_workers and checkpoint_every must be >= 0")
        if self.on_nonfinite not in NONFINITE_CHOICES:
            raise ConfigError(f"on_nonfinite must be one of {NONFINITE_CHOICES}, got {self.on_nonfinite!r}")
        if self.max_consecutive_skips < 1:
            raise ConfigError(f"max_consecutive_skips must be a positive integer, got {self.max_consecutive_skips}")

    def compiled(self, module: nn.Module) -> nn.Module:
        """``module`` as the training steps call it: compiled as ``compile`` says, or itself."""
        if self.compile == "off":
            return module
        # Static shapes: a training step's batch never changes size (the last partial batch is
        # dropped), and the search's groups differ in shape: one static graph each, not one
        # slower dynamic graph after the second group.
        parameter = next(module.parameters(), None)
        if parameter is not None and parameter.device.type == "cpu" and onednn_unsafe_convs(module):
            # Inductor's layout optimisation turns convolutions channels_last by itself, which
            # gives oneDNN the convolutions it trains wrongly (see onednn_unsafe_convs: weight
            # gradients 180x off for a width-2 ResNet-8, or a hang); keep the layout we chose.
            # (torch.compile takes a mode or options, not both: the mode's options are merged in.)
            options = {**torch._inductor.list_mode_options(self.compile), "layout_optimization": False}
            return torch.compile(module, options=options, dynamic=False)
        return torch.compile(module, mode=self.compile, dynamic=False)

    @property
    def memory_format(self) -> torch.memory_format:
        return torch.channels_last if self.channels_last else torch.contiguous_format

    def memory_format_for(self, module: nn.Module, device: torch.device) -> torch.memory_format:
        """The layout to train ``module`` in on ``device``: ``memory_format``, except on the CPU for
        networks that oneDNN would train wrongly in channels_last (see :func:`onednn_unsafe_convs`)."""
        if self.channels_last and device.type == "cpu" and onednn_unsafe_convs(module):
            return torch.contiguous_format
        return self.memory_format


def onednn_unsafe_convs(module: nn.Module) -> list[str]:
    """Names of the convolutions of ``module`` whose channels_last weight gradient oneDNN gets wrong.

    With torch 2.14.1 on x86-64 CPUs, the backward of a 1x1 convolution with stride > 1 and fewer
    than 8 input channels in channels_last layout (oneDNN's jit_avx2_1x1 bwd-weights kernel)
    returns weight gradients off by up to 120 %, corrupts the heap or never returns; the
    contiguous layout is right. ResNets narrower than width 8 have such shortcut convolutions.
    """
    return [name for name, m in module.named_modules()
            if isinstance(m, nn.Conv2d) and m.kernel_size == (1, 1) and max(m.stride) > 1
            and m.in_channels < 8 and any(p.requires_grad for p in m.parameters())]


def resolve_device(name: str) -> torch.device:
    """The device an option names ("auto": the GPU when one is visible)."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"device must be cpu, cuda, cuda:N or auto, got {name!r}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {name!r} asked for, but no CUDA GPU is visible")
    if device.type == "cuda" and device.index is None:  # under torchrun: this process's GPU (LOCAL_RANK)
        device = torch.device("cuda", torch.cuda.current_device())
    return device


def autocast_for(amp: str, device: torch.device) -> contextlib.AbstractContextManager:
    """The autocast context of an ``amp`` choice (a no-op for "none")."""
    if amp == "none":
        return contextlib.nullcontext()
    if amp == "fp16" and device.type != "cuda":
        raise ConfigError("amp fp16 needs a CUDA device; use bf16 on the CPU")
    dtype = torch.bfloat16 if amp == "bf16" else torch.float16
    return torch.autocast(device.type, dtype=dtype)
