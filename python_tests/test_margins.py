"""OFD margins (dfa_ext.margins) against Monte-Carlo estimates of E[x | x < 0] and OFD's formula."""

from __future__ import annotations

import math

import pytest
import torch
from scipy.stats import norm
from torch import nn

from dfa_ext.errors import ModelError
from dfa_ext.margins import TAIL_THRESHOLD, bn_margins, group_margins
from dfa_ext.models import create


pytestmark = pytest.mark.usefixtures("one_thread")


# (mu, s) pairs of the formula branch, Phi(-mu/s) > 1e-3, including mu/s close to the threshold
FORMULA_PAIRS = [(mu, s) for s in (0.1, 0.5, 1.0, 2.5) for mu in (-2.0, -0.5, 0.0, 0.3, 1.0)
                 if norm.cdf(-mu / s) > TAIL_THRESHOLD] + [(2.9, 1.0), (0.75, 0.25)]
R_STAR = -norm.ppf(TAIL_THRESHOLD)  # mu/s beyond which OFD falls back to -3s (about 3.09)


def _bn(weights, biases) -> nn.BatchNorm2d:
    bn = nn.BatchNorm2d(len(weights))
    with torch.no_grad():
        bn.weight.copy_(torch.tensor(weights, dtype=torch.float32))
        bn.bias.copy_(torch.tensor(biases, dtype=torch.float32))
    return bn


def _ofd_margin(s: float, m: float) -> float:
    """OFD's get_margin_from_BN for one channel (scipy), as in its published code."""
    s = abs(s)
    if norm.cdf(-m / s) > 0.001:
        return -s * math.exp(-(m / s) ** 2 / 2) / math.sqrt(2 * math.pi) / norm.cdf(-m / s) + m
    return -3 * s


def test_margins_match_a_monte_carlo_estimate_of_the_negative_mean():
    mus = [mu for mu, _ in FORMULA_PAIRS]
    ss = [s for _, s in FORMULA_PAIRS]
    signs = [(-1) ** i for i in range(len(ss))]  # both signs of the BN weight
    margins = bn_margins(_bn([sg * s for sg, s in zip(signs, ss)], mus))
    z = torch.randn(2_000_000, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    for c, (mu, s) in enumerate(FORMULA_PAIRS):
        x = mu + s * z
        negative = x[x < 0]
        assert negative.numel() > 1000
        estimate = negative.mean().item()
        stderr = negative.std().item() / math.sqrt(negative.numel())
        assert abs(margins[c].item() - estimate) < 5 * stderr + 1e-6, (mu, s, estimate)


def test_fallback_branch_is_minus_three_s_on_either_side_of_the_threshold():
    s = 0.8
    below, above = (R_STAR - 0.01) * s, (R_STAR + 0.01) * s
    margins = bn_margins(_bn([s, -s, s, -2 * s], [below, below, above, 5.0]))
    exact = s * ((R_STAR - 0.01) - norm.pdf(R_STAR - 0.01) / norm.cdf(-(R_STAR - 0.01)))
    assert margins[0].item() == pytest.approx(exact, rel=1e-5)
    assert margins[1].item() == margins[0].item()
    assert margins[2].item() == pytest.approx(-3 * s, rel=1e-6)
    assert margins[3].item() == pytest.approx(-6 * s, rel=1e-6)
    assert exact > -3 * s  # the two branches really differ there


def test_margins_equal_ofd_published_formula():
    g = torch.Generator().manual_seed(1)
    weights = (torch.randn(64, generator=g) * 0.7).tolist()
    biases = (torch.randn(64, generator=g) * 1.5).tolist()
    margins = bn_margins(_bn(weights, biases))
    weights32 = _bn(weights, biases).weight.tolist()  # compare at the BN's float32 parameters
    biases32 = _bn(weights, biases).bias.tolist()
    expected = torch.tensor([_ofd_margin(w, b) for w, b in zip(weights32, biases32)])
    # bn_margins computes in float64 and rounds once to float32 (6e-8 relative): 1e-5 is 170x that
    torch.testing.assert_close(margins, expected.float(), rtol=1e-5, atol=1e-6)


def test_extreme_ratios_stay_finite():
    margins = bn_margins(_bn([1e-6, 1e-6, 1.0, 1.0], [-5.0, 5.0, -40.0, 40.0]))
    assert torch.isfinite(margins).all()
    torch.testing.assert_close(margins, torch.tensor([-5.0, -3e-6, -40.0, -3.0]),
                               rtol=1e-4, atol=1e-6)


def test_zero_weight_gives_min_of_mu_and_zero():
    margins = bn_margins(_bn([0.0, 0.0, 0.0], [-1.5, 0.0, 2.0]))
    assert margins.tolist() == [-1.5, 0.0, 0.0]


def test_output_is_a_detached_float32_vector():
    bn = _bn([1.0, 2.0, 0.5], [0.0, -1.0, 1.0])
    margins = bn_margins(bn)
    assert margins.shape == (3,) and margins.dtype == torch.float32
    assert not margins.requires_grad and (margins < 0).all()
    # identity BN: E[x | x < 0] of a standard normal
    assert bn_margins(nn.BatchNorm2d(2)).tolist() == pytest.approx([-math.sqrt(2 / math.pi)] * 2)
    assert bn_margins(nn.BatchNorm2d(2, affine=False)).tolist() == \
        pytest.approx([-math.sqrt(2 / math.pi)] * 2)


def test_group_margins_stack_the_layers():
    bns = [_bn([1.0, 0.5], [0.0, -1.0]), _bn([2.0, 1.0], [1.0, 0.0]), _bn([0.3, 0.3], [4, 0])]
    margins = group_margins(bns)
    assert margins.shape == (3, 2)
    for row, bn in zip(margins, bns):
        assert torch.equal(row, bn_margins(bn))


def test_group_margins_of_a_model_group():
    # Each row must be OFD's margin of the BatchNorm whose output the tapped layer feature is:
    # random affine parameters make the rows differ, and a forward hook shows which tensor each
    # BN really produced (a BN of the wrong layer or block would fail both checks).
    torch.manual_seed(0)
    model = create("wrn_16_2").eval()
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            with torch.no_grad():
                module.weight.uniform_(0.2, 2.0)
                module.bias.uniform_(-1.0, 1.0)
    produced = {}
    hooks = [m.register_forward_hook(lambda m, i, o: produced.__setitem__(m, o))
             for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    with torch.no_grad():
        out = model(torch.randn(2, 3, 8, 8), features=True)
    for hook in hooks:
        hook.remove()
    group = out.groups[1]
    margins = group_margins(group.bns)
    assert margins.shape == (len(group.layers), 64) and len(group.layers) == 2
    for row, bn, layer in zip(margins, group.bns, group.layers):
        assert produced[bn] is layer or torch.equal(produced[bn], layer)
        want = [_ofd_margin(s, m) for s, m in zip(bn.weight.tolist(), bn.bias.tolist())]
        torch.testing.assert_close(row.double(), torch.tensor(want, dtype=torch.float64), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("bns, match", [
    ([], "at least one"),
    ([nn.BatchNorm2d(4), None], "layer 1"),
    ([nn.BatchNorm2d(4), nn.BatchNorm2d(5)], r"\[4, 5\]"),
    ([nn.Conv2d(2, 2, 1)], "BatchNorm"),
])
def test_group_margins_rejects_bad_inputs(bns, match):
    with pytest.raises(ModelError, match=match):
        group_margins(bns)
