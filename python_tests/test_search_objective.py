"""Stage 1's objective against method.md section 5 written out by hand.

test_search.py checks that the architecture gradients are the derivatives of ``SearchNetwork``'s
losses; this module checks the losses themselves.  The reference below rebuilds every piece from
primitives (F.conv2d, batch-statistics BN, ReLU, softmax, norms, log-sum-exp) in float64, reading
only the parameters of the modules, never calling them:

    alpha = softmax(beta)
    L_ST  = mean_b || vec(s_b)/|vec(s_b)| - vec(A_b)/|vec(A_b)| ||^2,  s = ST-connector(S_g),
            A = sum_j alpha_j T_j (never margins)
    L_TS  = CE(student groups g+1..G and head (ReLU(TS-connector(A'))), labels),
            A' = sum_j alpha_j max(T_j, m_j) with ts_margins, else A
    L_val = gamma_st L_ST + gamma_ts L_TS;   L_train = CE(student(x), labels) + L_val

The two gammas differ (and the two paths give different values), so swapping them fails; every
network has the same width in every group, so a wrong group index or a skipped connector gives
wrong numbers instead of a shape error.
"""

from __future__ import annotations

from typing import Sequence

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dfa_ext import models
from dfa_ext.models.resnet_cifar import BasicBlock, CifarResNet
from dfa_ext.search import Architect, Batch, SearchNetwork
from dfa_ext.search.network import teacher_features

from dfa_helpers import randomize_bn

pytestmark = pytest.mark.usefixtures("one_thread")

WIDTH = 6  # stem and all three groups, teacher and student alike (see the module docstring)
CLASSES = 5
GAMMA_ST, GAMMA_TS = 0.7, 1.9  # distinct, so a swap is visible
# Both sides are float64 and compute the same formulas in a different order (fused kernels, BN
# written another way): rounding.F64's analysis bounds their difference far below 1e-10 of the
# O(1) terms (measured: ~5e-15), and every formula change tried moves them by more than 1e-3.
TOL = dict(rtol=1e-10, atol=1e-12)


def _problem(seed: int = 0, **net_options) -> tuple[SearchNetwork, list[Tensor], Batch, Batch]:
    """A resnet20-shaped teacher (K = 3 layers per group), a resnet14-shaped student (2 blocks per
    group, so S_i is not a group's first block), beta per group, and two batches of 8x8 images."""
    torch.manual_seed(seed)
    teacher = CifarResNet(20, (WIDTH,) * 4, num_classes=CLASSES, in_channels=1).double().eval()
    student = CifarResNet(14, (WIDTH,) * 4, num_classes=CLASSES, in_channels=1).double()
    randomize_bn(teacher, seed=seed + 1)
    pairs = models.pair_networks(teacher, student, (1, 8, 8))
    assert [p.num_layers for p in pairs] == [3, 3, 3]
    margins = [-torch.rand(p.num_layers, p.teacher_channels, dtype=torch.float64) for p in pairs]
    net = SearchNetwork(student, pairs, margins=margins, **net_options).double().train()
    randomize_bn(net, seed=seed + 2)  # student and both connectors: BN weight 1 / bias 0 would hide a skipped BN
    betas = [torch.tensor(b, dtype=torch.float64) for b in ([0.5, -0.4, 0.1], [-0.3, 0.8, 0.2], [0.6, 0.0, -0.7])]

    def batch(batch_seed: int) -> Batch:
        g = torch.Generator().manual_seed(batch_seed)
        images = torch.randn(8, 1, 8, 8, generator=g, dtype=torch.float64)
        labels = torch.randint(0, CLASSES, (8,), generator=g)
        return Batch(images, labels, teacher_features(teacher, images))

    return net, betas, batch(10), batch(11)


# ---- the method written out by hand -------------------------------------------------------------

def _bn(x: Tensor, bn: nn.BatchNorm2d) -> Tensor:
    """Training-mode BN (the search trains in train mode): batch mean and biased batch variance."""
    mean = x.mean(dim=(0, 2, 3), keepdim=True)
    var = ((x - mean) ** 2).mean(dim=(0, 2, 3), keepdim=True)
    return (x - mean) / torch.sqrt(var + bn.eps) * bn.weight.view(1, -1, 1, 1) + bn.bias.view(1, -1, 1, 1)


def _conv(x: Tensor, conv: nn.Conv2d) -> Tensor:
    return F.conv2d(x, conv.weight, stride=conv.stride, padding=conv.padding)


def _connector(x: Tensor, connector: nn.Sequential) -> Tensor:
    """1x1 conv + BN (the activation of a TS connector is applied by the caller)."""
    conv, bn = connector[0], connector[1]
    return _bn(_conv(x, conv), bn)


def _block(a: Tensor, block: BasicBlock) -> Tensor:
    """A post-activation basic block's pre-ReLU output: bn2(conv2(relu(bn1(conv1 a)))) + shortcut."""
    y = _bn(_conv(torch.relu(_bn(_conv(a, block.conv1), block.bn1)), block.conv2), block.bn2)
    shortcut = a if block.downsample is None else _bn(_conv(a, block.downsample[0]), block.downsample[1])
    return y + shortcut


def _head(a: Tensor, student: CifarResNet) -> Tensor:
    return F.linear(a.mean(dim=(2, 3)), student.head.fc.weight, student.head.fc.bias)


def _student(student: CifarResNet, images: Tensor) -> tuple[Tensor, list[Tensor]]:
    """The student's logits and each group's last pre-ReLU feature S_i."""
    a = torch.relu(_bn(_conv(images, student.stem.conv), student.stem.bn))
    lasts = []
    for blocks in student.groups:
        for block in blocks:
            p = _block(a, block)
            a = torch.relu(p)
        lasts.append(p)
    return _head(a, student), lasts


def _student_after(student: CifarResNet, group: int, h: Tensor) -> Tensor:
    """Logits of the student's groups group+1..G and head run on h (what forward_from(group + 1) means)."""
    a = h
    for blocks in student.groups[group + 1:]:
        for block in blocks:
            a = torch.relu(_block(a, block))
    return _head(a, student)


def _ce(logits: Tensor, labels: Tensor) -> Tensor:
    return (torch.logsumexp(logits, dim=1) - logits.gather(1, labels[:, None]).squeeze(1)).mean()


def _hand_losses(net: SearchNetwork, batch: Batch, group: int, beta: Tensor, *, objective: str,
                 gamma_st: float, gamma_ts: float, ts_margins: bool, with_ce: bool) -> dict[str, Tensor]:
    layers: Sequence[Tensor] = batch.teacher[group]
    alpha = torch.softmax(beta, dim=0)
    logits, lasts = _student(net.student, batch.images)
    losses = {}
    if with_ce:
        losses["ce"] = _ce(logits, batch.labels)
    if objective in ("bridge", "st"):
        s = _connector(lasts[group], net.st_connectors[group]).flatten(1)
        agg = sum(a * t for a, t in zip(alpha, layers)).flatten(1)  # no margins on the ST path
        u = s / s.norm(dim=1, keepdim=True)
        v = agg / agg.norm(dim=1, keepdim=True)
        losses["st"] = gamma_st * ((u - v) ** 2).sum(dim=1).mean()
    if objective in ("bridge", "ts"):
        m = net.margins(group)
        mapped = [torch.maximum(t, m[j].view(1, -1, 1, 1)) if ts_margins else t for j, t in enumerate(layers)]
        agg = sum(a * t for a, t in zip(alpha, mapped))
        h = torch.relu(_connector(agg, net.ts_connectors[group]))  # the student's group-input activation
        losses["ts"] = gamma_ts * _ce(_student_after(net.student, group, h), batch.labels)
    return losses


def _grads(loss: Tensor, leaves: Sequence[Tensor]) -> list[Tensor]:
    grads = torch.autograd.grad(loss, list(leaves), allow_unused=True)
    return [torch.zeros_like(x) if g is None else g for x, g in zip(leaves, grads)]


def _check(net: SearchNetwork, batch: Batch, group: int, beta: Tensor, *, with_ce: bool, **formula) -> dict:
    """The network's named losses, their sum's gradients w.r.t. beta and every weight, against the hand formula."""
    beta = beta.clone().requires_grad_(True)
    _, got = net(batch.images, batch.labels, batch.teacher[group], beta, group, with_ce)
    want = _hand_losses(net, batch, group, beta, with_ce=with_ce, **formula)
    assert set(got) == set(want)
    for name in want:
        torch.testing.assert_close(got[name], want[name], **TOL, msg=lambda m: f"loss {name!r}: {m}")
    leaves = [beta, *net.parameters()]
    names = ["beta", *(n for n, _ in net.named_parameters())]
    got_grads, want_grads = _grads(sum(got.values()), leaves), _grads(sum(want.values()), leaves)
    for name, g, w in zip(names, got_grads, want_grads):
        torch.testing.assert_close(g, w, **TOL, msg=lambda m: f"d/d{name}: {m}")
    return {name: loss.detach() for name, loss in want.items()}


# ---- the tests ----------------------------------------------------------------------------------

@pytest.mark.parametrize("kernels", ["fused", "reference"])
@pytest.mark.parametrize("ts_margins", [False, True], ids=["no-margins", "ts-margins"])
@pytest.mark.parametrize("group", [0, 1, 2])
def test_bridge_objective_matches_the_formula_of_the_method(group, ts_margins, kernels):
    """L_val (the beta objective) and L_train (with the student's CE), values and gradients w.r.t.
    beta, the student and both connectors; group 0 and 1 resume the student inside, group 2 at its head."""
    formula = dict(objective="bridge", gamma_st=GAMMA_ST, gamma_ts=GAMMA_TS, ts_margins=ts_margins)
    net, betas, train, val = _problem(kernels=kernels, **formula)
    layers, m = val.teacher[group], net.margins(group)
    below = torch.stack([(t < m[j].view(1, -1, 1, 1)) for j, t in enumerate(layers)])
    assert 0.05 < below.double().mean() < 0.95  # the margins clip part of every map, so they matter
    val_losses = _check(net, val, group, betas[group], with_ce=False, **formula)
    assert set(val_losses) == {"st", "ts"}
    # the unweighted paths differ, so the loss with swapped gammas differs from the right one
    assert abs(val_losses["st"] / GAMMA_ST - val_losses["ts"] / GAMMA_TS) > 1e-2
    train_losses = _check(net, train, group, betas[group], with_ce=True, **formula)
    assert set(train_losses) == {"ce", "st", "ts"}


@pytest.mark.parametrize("objective, gamma_st, gamma_ts", [
    ("st", GAMMA_ST, GAMMA_TS), ("ts", GAMMA_ST, GAMMA_TS),  # one path only, the other not even computed
    ("bridge", 0.0, GAMMA_TS), ("bridge", GAMMA_ST, 0.0),  # the bridge with one path weighted out
])
def test_each_bridge_path_alone_matches_its_formula(objective, gamma_st, gamma_ts):
    formula = dict(objective=objective, gamma_st=gamma_st, gamma_ts=gamma_ts, ts_margins=True)
    net, betas, _, val = _problem(**formula)
    _check(net, val, 1, betas[1], with_ce=False, **formula)


def test_ts_margins_change_the_ts_path_only():
    """ts_margins moves L_TS (margins applied before aggregation) and leaves L_ST margin-free."""
    group = 1
    losses = {}
    for ts_margins in (False, True):
        formula = dict(objective="bridge", gamma_st=GAMMA_ST, gamma_ts=GAMMA_TS, ts_margins=ts_margins)
        net, betas, _, val = _problem(**formula)
        losses[ts_margins] = _check(net, val, group, betas[group], with_ce=False, **formula)
    torch.testing.assert_close(losses[True]["st"], losses[False]["st"], **TOL)
    assert abs(losses[True]["ts"] - losses[False]["ts"]) > 1e-3


@pytest.mark.parametrize("ts_margins", [False, True], ids=["no-margins", "ts-margins"])
def test_first_order_architecture_gradient_is_the_hand_objectives_gradient(ts_margins):
    """What the Architect steps beta with is d/dbeta of the hand-written L_val on the validation batch
    (not L_train, not the training batch), and it leaves the BN statistics as they were."""
    group = 1
    net, betas, train, val = _problem(gamma_st=GAMMA_ST, gamma_ts=GAMMA_TS, ts_margins=ts_margins)
    params = nn.ParameterList(nn.Parameter(b.clone()) for b in betas)
    got = Architect(net, params).gradient(group, train, val)
    beta = betas[group].clone().requires_grad_(True)
    want_losses = _hand_losses(net, val, group, beta, objective="bridge", gamma_st=GAMMA_ST, gamma_ts=GAMMA_TS,
                               ts_margins=ts_margins, with_ce=False)
    want = torch.autograd.grad(sum(want_losses.values()), beta)[0]
    torch.testing.assert_close(got, want, **TOL)
