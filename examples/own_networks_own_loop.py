"""DFA with your own teacher, student, data and training loop (README: "Your own networks and
training loop").

    python examples/own_networks_own_loop.py --mode eager      # or compile, bf16

What it does, on scikit-learn's 8x8 digits held as a plain TensorDataset:
1. a small CNN teacher of our own, trained in our own loop;
2. the search: which mix of each teacher stage's blocks the student should imitate (stage 1);
3. the student trained in our own loop with cross-entropy + the DFA feature loss (stage 2), in
   eager mode, under torch.compile(fullgraph=True) or under bf16 autocast;
4. the same student trained without the feature loss, for comparison.
"""

from __future__ import annotations

import argparse
import copy
from pathlib import Path

import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import dfa_ext
from dfa_ext.models import HookedNetwork


class Block(nn.Module):
    """conv-BN-ReLU; the ReLU is a module named ``relu`` so the hooks can tap its input."""

    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(self.bn(self.conv(x)))


class SmallCNN(nn.Module):
    """Two stages of ``depth`` blocks (8x8, then 4x4 maps), global pooling and a linear head."""

    def __init__(self, width: int, depth: int, num_classes: int = 10) -> None:
        super().__init__()
        self.stage1 = nn.Sequential(Block(1, width), *(Block(width, width) for _ in range(depth - 1)))
        self.stage2 = nn.Sequential(Block(width, 2 * width, 2), *(Block(2 * width, 2 * width) for _ in range(depth - 1)))
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2 * width, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.stage2(self.stage1(x)))


def tapped(net: SmallCNN) -> HookedNetwork:
    """The DFA view of the network: each stage is a layer group, each block one tapped layer."""
    groups = [[f"{stage}.{i}" for i in range(len(getattr(net, stage)))] for stage in ("stage1", "stage2")]
    return HookedNetwork(net, groups, stages=["stage1", "stage2"], head=lambda model, h: model.head(h))


def digits(test_share: float = 0.3) -> tuple[TensorDataset, TensorDataset]:
    """scikit-learn's 1,797 8x8 digits, standardised, as [N, 1, 8, 8] float tensors."""
    images, labels = load_digits(return_X_y=True)
    images = torch.tensor(images, dtype=torch.float32).reshape(-1, 1, 8, 8)
    images = (images - images.mean()) / images.std()
    order = torch.randperm(len(images), generator=torch.Generator().manual_seed(0))
    cut = int(len(images) * (1 - test_share))
    train, test = order[:cut], order[cut:]
    labels = torch.tensor(labels)
    return TensorDataset(images[train], labels[train]), TensorDataset(images[test], labels[test])


@torch.no_grad()
def accuracy(net: nn.Module, data: TensorDataset) -> float:
    net.eval()
    images, labels = data.tensors
    return 100.0 * (net(images).argmax(1) == labels).float().mean().item()


def train(net: nn.Module, data: TensorDataset, epochs: int, step, extra_parameters=()) -> None:
    """Our own epoch loop: SGD with cosine decay; ``step(images, labels)`` returns the loss."""
    parameters = [*net.parameters(), *extra_parameters]
    optimizer = torch.optim.SGD(parameters, lr=0.05, momentum=0.9, weight_decay=5e-4, nesterov=True)
    loader = DataLoader(data, batch_size=64, shuffle=True, drop_last=True,
                        generator=torch.Generator().manual_seed(0))
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, epochs * len(loader))
    for _ in range(epochs):
        net.train()
        for images, labels in loader:
            loss = step(images, labels)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mode", choices=["eager", "compile", "bf16"], default="eager")
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--search-steps", type=int, default=200, help="search steps per teacher stage")
    parser.add_argument("--out", default="runs/example-own-loop")
    args = parser.parse_args()
    torch.manual_seed(0)
    train_set, test_set = digits()

    teacher = tapped(SmallCNN(width=32, depth=3))
    train(teacher, train_set, args.epochs, lambda x, y: F.cross_entropy(teacher(x), y))
    print(f"teacher: {accuracy(teacher, test_set):.2f}% test top-1")
    student = tapped(SmallCNN(width=8, depth=1))
    baseline = copy.deepcopy(student)

    # Stage 1: search the aggregation for this teacher and student (the search trains a copy).
    search = dfa_ext.SearchConfig(out=str(Path(args.out) / "search"), steps_per_group=args.search_steps,
                                  batch_size=64, progress=False)
    result = dfa_ext.run_search(search, teacher=teacher, student=student, data=train_set)
    for group in result.groups:
        print(f"searched alpha of {group.teacher_layers}: {[round(a, 3) for a in group.alpha]}")

    # Stage 2: cross-entropy + the DFA feature loss, in our own loop.
    dfa_loss = dfa_ext.DFALoss(teacher, student, result, input_shape=(1, 8, 8))

    def dfa_step(images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            teacher_features = teacher(images, features=True)
        with torch.autocast("cpu", torch.bfloat16, enabled=args.mode == "bf16"):
            student_features = student(images, features=True)
            return F.cross_entropy(student_features.logits.float(), labels) + dfa_loss(student_features, teacher_features)

    step = torch.compile(dfa_step, fullgraph=True) if args.mode == "compile" else dfa_step
    train(student, train_set, args.epochs, step, extra_parameters=dfa_loss.parameters())
    train(baseline, train_set, args.epochs, lambda x, y: F.cross_entropy(baseline(x), y))
    print(f"student with DFA ({args.mode}): {accuracy(student, test_set):.2f}% test top-1; "
          f"alone: {accuracy(baseline, test_set):.2f}%")


if __name__ == "__main__":
    main()
