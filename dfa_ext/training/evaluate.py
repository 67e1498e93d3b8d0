"""Test-set evaluation: loss, top-1 and top-5 accuracy, summed over every process."""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from ..data.device_batches import DeviceImages
from ..data.loader import make_loader
from ..data.user_batches import UserBatches
from ..losses import at_least_float32
from .distributed import DistContext, current_context


def correct_at_k(logits: torch.Tensor, labels: torch.Tensor, k: int) -> torch.Tensor:
    """How many of the B samples have their label among the k largest logits (a 0-dim tensor on
    the logits' device: no host synchronisation)."""
    k = min(k, logits.shape[1])
    top = logits.topk(k, dim=1).indices
    return (top == labels[:, None]).any(dim=1).sum()


@torch.no_grad()
def evaluate(model: nn.Module, dataset: Dataset, *, batch_size: int = 512,
             device: torch.device | str = "cpu", autocast: contextlib.AbstractContextManager | None = None,
             dist: DistContext | None = None,
             memory_format: torch.memory_format = torch.contiguous_format,
             on_device: DeviceImages | None = None) -> dict[str, float]:
    """Evaluates ``model`` (in eval mode, restored afterwards) on every sample of ``dataset``.

    Under several processes each evaluates its share and the sums are reduced, so every process
    gets the whole-set numbers. ``dataset`` may be a user's own loader (``UserBatches``): its
    batches are evaluated as they come (under several processes it must give each its share). ``on_device``: ``dataset``'s pixels on ``device`` (batches built
    there, see ``make_loader``).

    Returns:
        ``{"loss": mean cross-entropy, "top1": %, "top5": %}`` (top-5 is top-k for k = classes
        when there are fewer than 5).
    """
    dist = dist or current_context()
    was_training = model.training
    model.eval()
    sums = torch.zeros(4, dtype=torch.float64, device=device)  # loss, top1, top5, count; read once at the end
    loader = dataset.epoch(0) if isinstance(dataset, UserBatches) else make_loader(  # a user's own test loader
        dataset, batch_size, train=False, rank=dist.rank, world_size=dist.world_size, on_device=on_device)
    try:
        for images, labels in loader:
            images = images.to(device, non_blocking=True, memory_format=memory_format)
            labels = labels.to(device, non_blocking=True)
            with autocast or contextlib.nullcontext():
                logits = model(images)
            logits = at_least_float32(logits)
            sums += torch.stack([F.cross_entropy(logits, labels, reduction="sum").double(),
                                 correct_at_k(logits, labels, 1).double(), correct_at_k(logits, labels, 5).double(),
                                 torch.tensor(float(labels.numel()), dtype=torch.float64, device=device)])
    finally:
        model.train(was_training)
    loss, top1, top5, count = dist.all_reduce_sum(sums).tolist()
    count = max(count, 1.0)
    return {"loss": loss / count, "top1": 100.0 * top1 / count, "top5": 100.0 * top5 / count}
