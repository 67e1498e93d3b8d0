"""The second-order (DARTS "unrolled") beta gradient's finite-difference radius on problems where
|v| is far from 1.

The mixed Hessian-vector product is taken by central differences at w +/- eps v with
v = grad_w' L_val(w') and eps = fd_radius / |v| (method.md section 5), so the points lie fd_radius
from w in weight space whatever the scale of v. The tests of test_search.py build a problem with
|v| near 1.8, where eps = fd_radius, fd_radius / |v| and fd_radius * |v| are all about the same
size: these scale the validation loss (and so v) by 1e3 and 1e-3.
"""

from __future__ import annotations

import copy
import math
from typing import Sequence

import pytest
import torch
from torch import Tensor, nn

from dfa_ext import models
from dfa_ext.errors import ConfigError
from dfa_ext.search import Architect, Batch, SearchConfig, SearchNetwork
from dfa_ext.search.network import teacher_features

pytestmark = pytest.mark.usefixtures("one_thread")

FD_RADIUS = 0.01  # DARTS' radius, the Architect's default
GROUP = 2
SCALES = [1e3, 1e-3]


class ScaledValidation(SearchNetwork):
    """The search network with its validation loss L_val (the losses without the student's CE)
    multiplied by ``scale``; L_train is unchanged. So w' is unchanged, v and the true unrolled beta
    gradient are ``scale`` times those of the unscaled problem."""

    def __init__(self, *args, scale: float, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.scale = scale

    def forward(self, images: Tensor, labels: Tensor, teacher_layers: Sequence[Tensor], beta: Tensor,
                group: int, with_ce: bool) -> tuple[Tensor, dict[str, Tensor]]:
        logits, losses = super().forward(images, labels, teacher_layers, beta, group, with_ce)
        if not with_ce:
            losses = {name: self.scale * value for name, value in losses.items()}
        return logits, losses


def _problem(scale: float) -> tuple[ScaledValidation, nn.ParameterList, Batch, Batch, torch.optim.SGD]:
    """Tiny float64 networks (resnet14 teacher, resnet8 student, 8x8 images, batches of 6) and a
    weight optimiser (plain momentum, DARTS' unrolled step) that has taken one real step already,
    so its momentum buffers are part of the virtual step."""
    torch.manual_seed(0)
    teacher = models.create("resnet14", num_classes=3, in_channels=1).double().eval()
    student = models.create("resnet8", num_classes=3, in_channels=1).double()
    pairs = models.pair_networks(teacher, student, (1, 8, 8))
    net = ScaledValidation(student, pairs, scale=scale).double().train()
    betas = nn.ParameterList(nn.Parameter(0.3 * torch.randn(p.num_layers, dtype=torch.float64)) for p in pairs)

    def batch(seed: int) -> Batch:
        g = torch.Generator().manual_seed(seed)
        images = torch.randn(6, 1, 8, 8, generator=g, dtype=torch.float64)
        labels = torch.randint(0, 3, (6,), generator=g)
        return Batch(images, labels, teacher_features(teacher, images))

    train, val = batch(1), batch(2)
    optimizer = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9, weight_decay=3e-4)
    _loss(net, train, betas[GROUP].detach(), train=True).backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return net, betas, train, val, optimizer


def _loss(net: nn.Module, batch: Batch, beta: Tensor, *, train: bool) -> Tensor:
    return sum(net(batch.images, batch.labels, batch.teacher[GROUP], beta, GROUP, train)[1].values())


def _at(net: nn.Module, weights: Sequence[Tensor]) -> nn.Module:
    """A copy of ``net`` with the given weights (the real one and its BN statistics stay untouched)."""
    twin = copy.deepcopy(net)
    with torch.no_grad():
        for p, w in zip(twin.parameters(), weights, strict=True):
            p.copy_(w)
    return twin


def _darts_reference(net: ScaledValidation, betas: nn.ParameterList, train: Batch, val: Batch,
                     optimizer: torch.optim.SGD) -> tuple[Tensor, list[Tensor], list[Tensor]]:
    """method.md section 5 written out on copies of the network: w' = the weights after one real
    step of (a copy of) the optimiser on L_train; v = grad_w' L_val(w'); eps = 0.01 / |v|;
    gradient = grad_beta L_val(w') - xi [grad_beta L_train(w + eps v) - grad_beta L_train(w - eps v)] / (2 eps).
    Returns the gradient, w and v."""
    beta = betas[GROUP].detach().clone().requires_grad_()
    w = [p.detach().clone() for p in net.parameters()]
    twin = copy.deepcopy({"net": net, "optimizer": optimizer})  # the optimiser's state follows the copy
    twin["optimizer"].zero_grad(set_to_none=True)
    _loss(twin["net"], train, beta.detach(), train=True).backward()
    twin["optimizer"].step()
    unrolled = list(twin["net"].parameters())
    grads = torch.autograd.grad(_loss(twin["net"], val, beta, train=False), [beta, *unrolled], allow_unused=True)
    d_beta, *v = [torch.zeros_like(x) if g is None else g for x, g in zip([beta, *unrolled], grads)]  # unused: 0
    eps = FD_RADIUS / math.sqrt(sum(float((x**2).sum()) for x in v))
    shifted = [torch.autograd.grad(_loss(_at(net, [p + sign * eps * x for p, x in zip(w, v)]), train, beta,
                                         train=True), beta)[0] for sign in (1.0, -1.0)]
    xi = optimizer.param_groups[0]["lr"]
    return d_beta - xi * (shifted[0] - shifted[1]) / (2 * eps), w, list(v)


def _record_points(monkeypatch: pytest.MonkeyPatch) -> list:
    """Makes every Architect record the weights at which it evaluates its network (None: its own
    weights), in order, in the list returned (until the test ends)."""
    points: list = []
    real = Architect._weights_at

    def recording(self: Architect, values: Sequence[Tensor] | None = None):
        points.append(None if values is None else [x.detach().clone() for x in values])
        return real(self, values)

    monkeypatch.setattr(Architect, "_weights_at", recording)
    return points


def _norm(tensors: Sequence[Tensor]) -> float:
    return math.sqrt(sum(float((x.double() ** 2).sum()) for x in tensors))


@pytest.mark.parametrize("scale", SCALES)
def test_second_order_gradient_uses_the_radius_normalised_by_the_norm_of_v(scale: float) -> None:
    """The Architect's second-order beta gradient (DARTS' radius) equals the DARTS formula written
    out with eps = 0.01 / |v|, on problems with |v| near 1.8e3 and 1.8e-3; and, as the true
    unrolled gradient is linear in L_val, it is ``scale`` times the unscaled problem's.

    Exists for a finite-difference step that is not normalised by |v|. Checked to fail with each
    planted in dfa_ext/search/architect.py: ``eps = self.fd_radius`` and
    ``eps = self.fd_radius * |v|`` (both scales fail each: at 1e3 the points land 17.5 or 31,000
    from w instead of 0.01; at 1e-3, 2e-5 or 3e-8 away, which gives another finite-difference
    estimate: 26 % off)."""
    net, betas, train, val, optimizer = _problem(scale)
    want, _, v = _darts_reference(net, betas, train, val, optimizer)
    assert not 1e-2 < _norm(v) < 1e2  # far from 1: the three radii differ by orders of magnitude
    got = Architect(net, betas, second_order=True, fd_radius=FD_RADIUS).gradient(GROUP, train, val, optimizer)
    torch.testing.assert_close(got, want, rtol=1e-7, atol=0.0)

    net1, betas1, train1, val1, optimizer1 = _problem(1.0)
    unscaled = Architect(net1, betas1, second_order=True, fd_radius=FD_RADIUS).gradient(GROUP, train1, val1,
                                                                                        optimizer1)
    torch.testing.assert_close(got, scale * unscaled, rtol=1e-7, atol=0.0)
    first = Architect(net, betas).gradient(GROUP, train, val)
    assert not torch.allclose(got, first, rtol=1e-3)  # the unrolled term matters here


@pytest.mark.parametrize("scale", SCALES)
def test_finite_difference_points_lie_fd_radius_from_w_along_v(scale: float, monkeypatch: pytest.MonkeyPatch) -> None:
    """The last two points the Architect evaluates are w + eps v and w - eps v with v computed here
    independently and eps = fd_radius / |v|: fd_radius from w in weight space, whatever |v|.

    Exists for a finite-difference step that is not normalised by |v|. Checked to fail with each
    planted in dfa_ext/search/architect.py: ``eps = self.fd_radius`` and ``eps = self.fd_radius * |v|``."""
    net, betas, train, val, optimizer = _problem(scale)
    _, w, v = _darts_reference(net, betas, train, val, optimizer)
    eps = FD_RADIUS / _norm(v)
    points = _record_points(monkeypatch)
    Architect(net, betas, second_order=True, fd_radius=FD_RADIUS).gradient(GROUP, train, val, optimizer)
    plus, minus = points[-2:]
    for sign, point in ((1.0, plus), (-1.0, minus)):
        assert _norm([p - x for p, x in zip(point, w)]) == pytest.approx(FD_RADIUS, rel=1e-9)
        for p, x, vi in zip(point, w, v, strict=True):
            torch.testing.assert_close(p, x + sign * eps * vi, rtol=1e-9, atol=1e-12)


def test_a_validation_loss_that_does_not_depend_on_the_weights_has_no_unrolled_term() -> None:
    """v = 0 (here the validation loss scaled by 0; also e.g. objective "st" with gamma_st = 0):
    the Hessian-vector term is 0, and the gradient is the first-order one (it was a
    ZeroDivisionError in eps = fd_radius / |v|)."""
    net, betas, train, val, optimizer = _problem(0.0)
    got = Architect(net, betas, second_order=True).gradient(GROUP, train, val, optimizer)
    assert torch.equal(got, torch.zeros_like(got))


@pytest.mark.parametrize("radius", [0.0, -0.01])
def test_a_finite_difference_radius_that_is_not_positive_is_refused(radius: float) -> None:
    """fd_radius = 0 divided the difference by 2 eps = 0 (a NaN gradient, silently)."""
    with pytest.raises(ConfigError, match=f"fd_radius must be > 0, got {radius}"):
        SearchConfig(teacher="teacher.pt", fd_radius=radius).validate()
    net, betas, *_ = _problem(1.0)
    with pytest.raises(ValueError, match=f"fd_radius must be > 0, got {radius}"):  # the Python API too
        Architect(net, betas, second_order=True, fd_radius=radius)
