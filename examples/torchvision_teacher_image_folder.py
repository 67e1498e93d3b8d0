"""A torchvision teacher and a custom student on an image folder (README: "Your own networks and
training loop").

    python examples/torchvision_teacher_image_folder.py --data-dir path/to/images
    python examples/torchvision_teacher_image_folder.py --make-tiny-folder runs/tiny-images   # anywhere

The data pipeline is the user's: torchvision.datasets.ImageFolder over DATA_DIR/train and
DATA_DIR/test (one subfolder per class), with its own transforms (Resize to a small square,
ToTensor, Normalize); the package takes the datasets as they are. ``--make-tiny-folder DIR`` first
writes a small synthetic folder there (3 classes of coloured stripes plus noise, 24 train and 8 test
24x24 PNGs each) and uses it. A folder that a run already filled (--out) is resumed, and a finished
run is not trained again: use a new --out for other settings.

What it does:
1. the teacher: torchvision's resnet18 (CIFAR-style stem for small images), trained with
   dfa_ext.train_teacher;
2. the student: a small CNN of our own with four stages whose maps have the sizes of resnet18's
   layer1..layer4, wrapped in HookedNetwork; pair_networks shows which groups meet;
3. the search (stage 1): which mix of each resnet18 layer's blocks the student should imitate;
4. DFA distillation (stage 2) with that mix, by dfa_ext.run_distill.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn
from torchvision import datasets, transforms

import dfa_ext
from dfa_ext.models import HookedNetwork, create, pair_networks
from own_networks_own_loop import Block  # conv-BN-ReLU with its ReLU a module (this folder is on sys.path)

# Per class: an RGB colour and the direction of its stripes (rows, columns, diagonals).
PALETTE = [(220, 60, 40), (40, 180, 70), (50, 80, 220), (210, 190, 40), (170, 60, 200), (40, 190, 200)]
STRIPES = ["rows", "columns", "diagonals"]


def make_tiny_folder(root: Path, classes: int = 3, train_per_class: int = 24, test_per_class: int = 8,
                     size: int = 24, seed: int = 0) -> None:
    """Writes root/{train,test}/class{c}/{i}.png: stripes of one colour per class, random phase, noise."""
    rng = np.random.default_rng(seed)
    rows, cols = np.mgrid[0:size, 0:size]
    for split, count in (("train", train_per_class), ("test", test_per_class)):
        for c in range(classes):
            folder = root / split / f"class{c}"
            folder.mkdir(parents=True, exist_ok=True)
            coordinate = {"rows": rows, "columns": cols, "diagonals": rows + cols}[STRIPES[c % len(STRIPES)]]
            for i in range(count):
                stripes = ((coordinate + rng.integers(4)) // 2) % 2  # 2-pixel stripes, shifted at random
                image = stripes[..., None] * np.array(PALETTE[c % len(PALETTE)]) + rng.normal(0, 40, (size, size, 3))
                Image.fromarray(np.clip(image, 0, 255).astype(np.uint8)).save(folder / f"{i:03d}.png")


def image_folders(data_dir: Path, image_size: int) -> tuple[datasets.ImageFolder, datasets.ImageFolder]:
    """The user's own pipeline: ImageFolder with Resize, ToTensor and Normalize."""
    transform = transforms.Compose([
        transforms.Resize((image_size, image_size)),
        transforms.ToTensor(),
        transforms.Normalize((0.5, 0.5, 0.5), (0.25, 0.25, 0.25)),
    ])
    return (datasets.ImageFolder(str(data_dir / "train"), transform=transform),
            datasets.ImageFolder(str(data_dir / "test"), transform=transform))


class FourStageCNN(nn.Module):
    """A stem and four stages of one block each; stages 2-4 halve the map, as resnet18's layer2..4
    do (with small_input=True resnet18 keeps the full size in layer1: S, S/2, S/4, S/8)."""

    def __init__(self, widths: tuple[int, int, int, int] = (8, 16, 32, 64), num_classes: int = 10) -> None:
        super().__init__()
        self.stem = Block(3, widths[0])
        self.stage1 = nn.Sequential(Block(widths[0], widths[0]))
        self.stage2 = nn.Sequential(Block(widths[0], widths[1], 2))
        self.stage3 = nn.Sequential(Block(widths[1], widths[2], 2))
        self.stage4 = nn.Sequential(Block(widths[2], widths[3], 2))
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(widths[3], num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.stage4(self.stage3(self.stage2(self.stage1(self.stem(x))))))


def tapped_student(num_classes: int) -> HookedNetwork:
    """The DFA view of the student: each stage a layer group, its block the tapped layer."""
    stages = ["stage1", "stage2", "stage3", "stage4"]
    return HookedNetwork(FourStageCNN(num_classes=num_classes), [[f"{s}.0"] for s in stages], stages=stages,
                         head=lambda model, h: model.head(h))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--data-dir", type=Path, help="folder with train/ and test/, one subfolder per class")
    where.add_argument("--make-tiny-folder", type=Path, metavar="DIR",
                       help="write a small synthetic image folder to DIR and use it")
    parser.add_argument("--image-size", type=int, default=16, help="Resize target: images become S x S")
    parser.add_argument("--teacher-epochs", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=3, help="distillation epochs")
    parser.add_argument("--search-steps", type=int, default=4, help="search steps per teacher layer group")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--out", type=Path, default=Path("runs/example-image-folder"))
    args = parser.parse_args()
    torch.manual_seed(0)
    data_dir = args.data_dir
    if args.make_tiny_folder is not None:
        make_tiny_folder(args.make_tiny_folder)
        data_dir = args.make_tiny_folder
    train, test = image_folders(data_dir, args.image_size)
    num_classes = len(train.classes)
    print(f"{data_dir}: {len(train)} train and {len(test)} test images, classes {train.classes}, "
          f"resized to {args.image_size}x{args.image_size}")
    common = {"batch_size": args.batch_size, "progress": False, "tensorboard": False}

    teacher = create("torchvision:resnet18", num_classes=num_classes, in_channels=3, small_input=True)
    fit = dfa_ext.train_teacher(dfa_ext.TeacherConfig(out=str(args.out / "teacher"), epochs=args.teacher_epochs,
                                                      lr=0.05, **common), model=teacher, data=(train, test))
    print(f"teacher torchvision:resnet18: {fit.best_top1:.2f}% best, {fit.last_top1:.2f}% last test top-1 "
          f"({fit.epochs} epochs, {fit.seconds:.1f} s)")

    student = tapped_student(num_classes)
    print("pairing (teacher group -> student layer):")
    for pair in pair_networks(teacher, student, (3, args.image_size, args.image_size)):
        h, w = pair.spatial_size
        print(f"  group {pair.index}: {pair.num_layers} teacher layers {list(pair.teacher_layer_names)} "
              f"({pair.teacher_channels} ch) -> {pair.student_layer_name} ({pair.student_channels} ch), {h}x{w}")

    search = dfa_ext.run_search(dfa_ext.SearchConfig(out=str(args.out / "search"), steps_per_group=args.search_steps,
                                                     **common), teacher=teacher, student=student, data=train)
    print(f"search: {args.search_steps} steps per group, {search.seconds:.1f} s")
    for group in search.groups:
        print(f"searched alpha of {list(group.teacher_layers)}: {[round(a, 3) for a in group.alpha]}")

    # Stage 2 takes the search result as it is (the command line names the search.json it wrote).
    distill = dfa_ext.DistillConfig(method="dfa", aggregation=search,
                                    out=str(args.out / "distill"), epochs=args.epochs, lr=0.05, **common)
    fit = dfa_ext.run_distill(distill, teacher=teacher, student=student, data=(train, test))
    print(f"student with DFA: {fit.best_top1:.2f}% best, {fit.last_top1:.2f}% last test top-1 "
          f"({fit.epochs} epochs, {fit.seconds:.1f} s; checkpoints in {fit.out_dir})")


if __name__ == "__main__":
    main()
