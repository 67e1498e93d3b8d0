"""Teacher/student group pairing and the connectors sized from it (dfa_ext.models.pairing)."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from torch import nn

from dfa_ext.errors import ModelError
from dfa_ext.models import (GroupPair, HookedNetwork, create, make_st_connector, make_ts_connector,
                            pair_networks)


pytestmark = pytest.mark.usefixtures("one_thread")


CIFAR = (3, 32, 32)


@pytest.mark.parametrize("teacher, student, layers, t_channels, s_channels, sizes", [
    ("wrn_40_2", "wrn_16_2", (6, 6, 6), (32, 64, 128), (32, 64, 128), (32, 16, 8)),
    ("resnet56", "resnet20", (9, 9, 9), (16, 32, 64), (16, 32, 64), (32, 16, 8)),
    ("resnet32x4", "resnet8x4", (5, 5, 5), (64, 128, 256), (64, 128, 256), (32, 16, 8)),
    ("torchvision:resnet50", "torchvision:resnet18", (3, 4, 6, 3), (256, 512, 1024, 2048),
     (64, 128, 256, 512), (8, 4, 2, 1)),
])
def test_pairs(teacher, student, layers, t_channels, s_channels, sizes):
    t_net, s_net = create(teacher, num_classes=5), create(student, num_classes=5)
    pairs = pair_networks(t_net, s_net, CIFAR)
    assert [p.index for p in pairs] == list(range(len(layers)))
    assert tuple(p.num_layers for p in pairs) == layers
    assert tuple(p.teacher_channels for p in pairs) == t_channels
    assert tuple(p.student_channels for p in pairs) == s_channels
    assert tuple(p.spatial_size for p in pairs) == tuple((s, s) for s in sizes)
    with torch.no_grad():
        t_out = t_net.eval()(torch.randn(1, *CIFAR), features=True)
        s_out = s_net.eval()(torch.randn(1, *CIFAR), features=True)
    for p, t_group, s_group in zip(pairs, t_out.groups, s_out.groups):
        assert p.teacher_layer_names == t_group.names and len(t_group.names) == p.num_layers
        assert p.student_layer_name == s_group.names[-1]
        assert p.st_connector == (p.student_channels, p.teacher_channels)
        assert p.ts_connector == (p.teacher_channels, p.student_channels)
        st = p.make_st_connector().eval()
        ts = p.make_ts_connector(s_net.group_input_activation).eval()
        with torch.no_grad():
            assert st(s_group.last).shape == t_group.last.shape
            assert ts(t_group.last).shape == s_group.last.shape
        assert ts[-1] is s_net.group_input_activation
    with pytest.raises(dataclasses.FrozenInstanceError):
        pairs[0].index = 3


def test_pairing_keeps_modes_and_bn_statistics():
    teacher, student = create("resnet14"), create("resnet8")
    teacher.eval()
    student.train()
    student.groups[1][0].bn1.eval()  # a mixed-mode network must come back as it was
    before = {k: v.clone() for k, v in student.state_dict().items()}
    pair_networks(teacher, student, CIFAR)
    assert not any(m.training for m in teacher.modules())
    assert student.training and not student.groups[1][0].bn1.training
    assert all(m.training for m in student.modules() if m is not student.groups[1][0].bn1)
    for k, v in student.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_pairing_works_on_mnist_shaped_inputs():
    pairs = pair_networks(create("resnet14", in_channels=1), create("wrn_16_1", in_channels=1),
                          (1, 28, 28))
    assert [p.spatial_size for p in pairs] == [(28, 28), (14, 14), (7, 7)]
    assert [p.num_layers for p in pairs] == [2, 2, 2]


def test_different_group_counts_cannot_be_paired():
    with pytest.raises(ModelError) as info:
        pair_networks(create("resnet20"), create("torchvision:resnet18"), CIFAR)
    message = str(info.value)
    assert "resnet20" in message and "torchvision:resnet18" in message
    assert "3 groups [32x32, 16x16, 8x8]" in message
    assert "4 groups [8x8, 4x4, 2x2, 1x1]" in message


def test_different_spatial_sizes_cannot_be_paired():
    import torchvision

    # three groups, like resnet20, but at 4x4 / 2x2 / 1x1 for 32x32 images
    model = torchvision.models.resnet18(num_classes=10)
    student = HookedNetwork(model, [["layer2.0", "layer2.1"], ["layer3.0", "layer3.1"],
                                    ["layer4.0", "layer4.1"]])
    expected = (r"teacher resnet20 and student HookedNetwork .* 3 groups \[32x32, 16x16, 8x8\], "
                r"student 3 groups \[4x4, 2x2, 1x1\]")
    with pytest.raises(ModelError, match=expected):
        pair_networks(create("resnet20"), student, CIFAR)


@pytest.mark.parametrize("shape", [(3, 32), (3, 0, 32), (3.0, 32, 32)])
def test_bad_input_shape(shape):
    with pytest.raises(ModelError, match="input_shape"):
        pair_networks(create("resnet8"), create("resnet8"), shape)


def test_connectors_follow_ofd_init():
    st = make_st_connector(64, 256)
    conv, bn = st
    assert conv.kernel_size == (1, 1) and conv.bias is None
    assert (conv.in_channels, conv.out_channels) == (64, 256)
    assert conv.weight.std().item() == pytest.approx(math.sqrt(2 / 256), rel=0.05)
    assert torch.all(bn.weight == 1) and torch.all(bn.bias == 0) and bn.num_features == 256
    act = nn.ReLU()
    ts = make_ts_connector(256, 64, act)
    assert len(ts) == 3 and ts[2] is act
    assert (ts[0].in_channels, ts[0].out_channels, ts[1].num_features) == (256, 64, 64)
    out = ts(torch.randn(2, 256, 4, 4))
    assert out.shape == (2, 64, 4, 4) and (out >= 0).all()
    with pytest.raises(ModelError):
        make_st_connector(0, 4)


def test_group_pair_builds_fresh_connectors():
    pair = GroupPair(index=0, num_layers=2, teacher_channels=8, student_channels=4,
                     spatial_size=(4, 4), teacher_layer_names=("a", "b"), student_layer_name="c")
    one, two = pair.make_st_connector(), pair.make_st_connector()
    assert one[0].weight.shape == (8, 4, 1, 1) and one[0] is not two[0]
    assert pair.make_ts_connector(nn.Identity())[0].weight.shape == (4, 8, 1, 1)
