"""Why a search finds what it finds: the measurements behind "Is the search stable?" in bench/RESULTS.md.

    python experiments/diagnose_search.py runs/study/teacher/last.pt [--seeds 0 1 2 3 4] [--warm 0 200]

For the teacher of the study (the mnist-1k preset's data) it prints
1. per teacher layer: the share of its energy in per-channel means (the ST connector ends in a
   BN, which removes exactly that part, so the cosine term of L_ST cannot reward it), the
   fraction of elements below OFD's BN margin, and the BN margin against the measured
   E[x | x < 0] (the empirical margin);
2. per group and student seed: the beta gradient of L_ST and of L_TS at uniform alpha, averaged
   over the whole search-val split, for a fresh student and after W warm-up steps of the weights
   (student and connectors, as the search's weight step at uniform alpha). A gradient whose sign
   changes with the seed is the seed's alpha, not the teacher's.
"""

from __future__ import annotations

import argparse

import torch

from dfa_ext import models
from dfa_ext.data import load_data
from dfa_ext.data.loader import batch_stream, make_loader
from dfa_ext.data.split import split_train_val
from dfa_ext.margins import teacher_margins
from dfa_ext.presets import MNIST_1K
from dfa_ext.search.network import SearchNetwork, teacher_features
from dfa_ext.training.teacher import load_teacher

STUDENT = MNIST_1K.commands["search"]


def layer_statistics(teacher, data, input_shape) -> None:
    images = torch.stack([data.train[i][0] for i in range(0, len(data.train), 2)])
    feats = teacher_features(teacher, images)
    bn = teacher_margins(teacher, input_shape)
    print("layer | energy share of per-channel means | below BN margin | BN margin (mean) | E[x|x<0] (mean)")
    for g, layers in enumerate(feats):
        for j, t in enumerate(layers):
            mean_c = t.mean(dim=(0, 2, 3), keepdim=True)
            share = (mean_c.expand_as(t).square().sum() / t.square().sum()).item()
            below = (t < bn[g][j].view(1, -1, 1, 1)).float().mean().item()
            negative = torch.stack([t[:, c][t[:, c] < 0].mean() for c in range(t.shape[1])]).nanmean().item()
            print(f"g{g}.b{j} | {share:.3f} | {below:.3f} | {bn[g][j].mean():.3f} | {negative:.3f}")


def beta_gradients(teacher, data, input_shape, seeds: list[int], warm: list[int]) -> None:
    search_train, search_val = split_train_val(data.train, 0.5, 0)
    val = list(make_loader(search_val, 250, train=False))
    val_feats = [teacher_features(teacher, x) for x, _ in val]
    print("\nseed | group | warm-up steps | dL_ST/dbeta | dL_TS/dbeta | sum")
    for seed in seeds:
        torch.manual_seed(seed)
        student = models.create(STUDENT["student"], num_classes=10, in_channels=1, **STUDENT["student_options"])
        net = SearchNetwork(student, models.pair_networks(teacher, student, input_shape), objective="bridge")
        optimizer = torch.optim.SGD(net.parameters(), lr=0.025, momentum=0.9, weight_decay=3e-4)
        stream = batch_stream(search_train, 64, seed=seed)
        for group in range(len(val_feats[0])):
            beta, done = torch.zeros(len(val_feats[0][group])), 0
            for steps in warm:
                net.train()
                for _ in range(steps - done):  # the search's weight step at uniform alpha
                    x, y = next(stream)
                    _, losses = net(x, y, teacher_features(teacher, x)[group], beta, group, True)
                    optimizer.zero_grad()
                    sum(losses.values()).backward()
                    torch.nn.utils.clip_grad_norm_(net.parameters(), 5.0)
                    optimizer.step()
                done = steps
                b = beta.clone().requires_grad_()
                st, ts = torch.zeros_like(b), torch.zeros_like(b)
                for (x, y), f in zip(val, val_feats):
                    _, losses = net(x, y, f[group], b, group, False)
                    st += torch.autograd.grad(losses["st"], b)[0] / len(val)
                    ts += torch.autograd.grad(losses["ts"], b)[0] / len(val)
                cells = [" ".join(f"{v:+.4f}" for v in t.tolist()) for t in (st, ts, st + ts)]
                print(f"{seed} | {group} | {steps} | " + " | ".join(cells), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("teacher")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--warm", type=int, nargs="+", default=[0, 200])
    args = parser.parse_args()
    torch.set_num_threads(1)
    data = load_data(MNIST_1K.common["data"], None, augment=True, seed=0, **MNIST_1K.common["data_options"])
    teacher, _ = load_teacher(args.teacher, data.spec)
    input_shape = (1, data.spec.image_size, data.spec.image_size)
    with torch.no_grad():
        layer_statistics(teacher, data, input_shape)
    beta_gradients(teacher, data, input_shape, args.seeds, sorted(args.warm))


if __name__ == "__main__":
    main()
