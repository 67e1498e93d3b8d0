"""The CIFAR model families and the tapped-network contract (dfa_ext.models).

Features are checked against independent, functional re-implementations of the canonical
RepDistiller ResNet and Zagoruyko WRN forward passes, so a wrong tap point, a missing BN or an
in-place op that clobbers a feature fails here.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dfa_ext.errors import ModelError
from dfa_ext.models import (CifarResNet, HookedNetwork, TapOutput, WideResNet, as_tapped,
                            available_models, create, rebuild_record)
from dfa_helpers import F64, randomize_bn

pytestmark = pytest.mark.usefixtures("one_thread")


def _image(shape=(3, 16, 16), batch=2, seed=0) -> torch.Tensor:
    return torch.randn((batch,) + tuple(shape), generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------- registry and shapes

@pytest.mark.parametrize("name", available_models())
def test_every_named_model_gives_logits_of_the_right_shape(name):
    for shape, features in [((1, 28, 28), True), ((3, 32, 32), False)]:
        model = create(name, num_classes=7, in_channels=shape[0]).eval()
        with torch.no_grad():
            out = model(_image(shape, batch=1), features=features)
        if features:
            assert isinstance(out, TapOutput) and out.logits.shape == (1, 7)
            assert len(out.groups) == model.num_groups == len(model.group_names())
        else:
            assert isinstance(out, torch.Tensor) and out.shape == (1, 7)


@pytest.mark.parametrize("name", ["resnet20", "wrn_16_2"])
def test_small_8x8_images_work(name):
    model = create(name, num_classes=5).eval()
    with torch.no_grad():
        out = model(_image((3, 8, 8)), features=True)
    assert out.logits.shape == (2, 5)
    assert [g.last.shape[-1] for g in out.groups] == [8, 4, 2]


def test_unknown_name_lists_the_available_models():
    with pytest.raises(ModelError) as info:
        create("resnet_nope")
    message = str(info.value)
    assert "resnet_nope" in message
    assert all(name in message for name in available_models())
    assert "'pkg.module:factory'" in message  # trap: the import-path form was undiscoverable
    # "torchvision:resnet19" has the import-path form too, but is a mistyped zoo name
    with pytest.raises(ModelError, match="unknown model 'torchvision:resnet19'"):
        create("torchvision:resnet19")


@pytest.mark.parametrize("name, kwargs", [
    ("resnet21", {}), ("resnet2", {}), ("wrn_17_2", {}), ("wrn_16_0", {}),
    ("resnet20", {"dropout": 0.3}), ("wrn_16_2", {"dropout": 1.5}), ("wrn_16_2", {"depth": 3}),
    ("resnet20", {"num_classes": 0}), ("resnet20", {"in_channels": -1}),
    ("torchvision:resnet18", {"dropout": 0.1}), ("torchvision:resnet19", {}),
])
def test_bad_arguments_raise_model_error(name, kwargs):
    with pytest.raises(ModelError):
        create(name, **kwargs)


def test_generic_depths_and_dropout():
    assert isinstance(create("resnet26"), CifarResNet)
    model = create("resnet26x4")
    assert len(model.groups[0]) == 4 and model.groups[0][0].bn2.num_features == 64
    model = create("wrn_22_3", dropout=0.3)
    assert isinstance(model, WideResNet) and len(model.groups[1]) == 3
    assert model.groups[2][0].bn2.num_features == 192
    assert any(isinstance(m, nn.Dropout) and m.p == 0.3 for m in model.modules())


@pytest.mark.parametrize("name, blocks, channels", [
    ("resnet56", 9, (16, 32, 64)), ("resnet20", 3, (16, 32, 64)),
    ("resnet8x4", 1, (64, 128, 256)), ("resnet32x4", 5, (64, 128, 256)),
    ("wrn_40_2", 6, (32, 64, 128)), ("wrn_16_2", 2, (32, 64, 128)),
])
def test_group_layout(name, blocks, channels):
    model = create(name).eval()
    with torch.no_grad():
        out = model(_image((3, 32, 32), batch=1), features=True)
    assert model.num_groups == 3
    for g, (group, c, size) in enumerate(zip(out.groups, channels, (32, 16, 8))):
        assert len(group.layers) == len(group.names) == len(group.bns) == blocks
        assert group.names == tuple(f"group{g}.block{j}" for j in range(blocks))
        assert all(t.shape == (1, c, size, size) for t in group.layers)
        assert group.last is group.layers[-1]


@pytest.mark.parametrize("name, width, widths", [
    ("resnet8", 4, (4, 4, 8, 16)), ("resnet20", 8, (8, 8, 16, 32)), ("resnet8x4", 16, (8, 16, 32, 64)),
    ("resnet8", 1, (1, 1, 2, 4)),
])
def test_resnet_width_scales_every_group(name, width, widths):
    model = create(name, width=width)
    assert model.stem.conv.out_channels == widths[0]
    assert [group[-1].bn2.num_features for group in model.groups] == list(widths[1:])
    assert model(_image((3, 32, 32), batch=2)).shape == (2, 10)
    for bad in (0, 2.5, True):
        with pytest.raises(ModelError, match="width"):
            create(name, width=bad)


def test_init_is_kaiming_and_bn_identity():
    model = create("wrn_16_4")
    conv = model.groups[2][1].conv2  # 256 -> 256, 3x3: fan_out = 9 * 256
    assert conv.weight.std().item() == pytest.approx(math.sqrt(2 / (9 * 256)), rel=0.05)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            assert torch.all(m.weight == 1) and torch.all(m.bias == 0)


# ---------------------------------------------------------------- independent references

def _bn(x, bn):
    return F.batch_norm(x, bn.running_mean, bn.running_var, bn.weight, bn.bias, False, 0.0, bn.eps)


def _reference_resnet(model: CifarResNet, x):
    """RepDistiller's post-activation ResNet in eval mode: (logits, per-group pre-ReLU lists)."""
    h = F.relu(_bn(F.conv2d(x, model.stem.conv.weight, padding=1), model.stem.bn))
    groups = []
    for blocks in model.groups:
        pre = []
        for b in blocks:
            out = F.relu(_bn(F.conv2d(h, b.conv1.weight, stride=b.conv1.stride, padding=1), b.bn1))
            out = _bn(F.conv2d(out, b.conv2.weight, padding=1), b.bn2)
            if b.downsample is not None:
                conv, bn = b.downsample
                out = out + _bn(F.conv2d(h, conv.weight, stride=conv.stride), bn)
            else:
                out = out + h
            pre.append(out)
            h = F.relu(out)
        groups.append(pre)
    return F.linear(h.mean((2, 3)), model.head.fc.weight, model.head.fc.bias), groups


def _reference_wrn(model: WideResNet, x):
    """The canonical WRN (bn1 at each block's input, a final BN) in eval mode; the tap of a block
    is the next BN applied to its output.  In this package the block before (or the stem) owns
    that bn1, so block (g, j)'s bn1 is the out_bn of the block before it."""
    blocks = [b for group in model.groups for b in group]
    input_bns = [model.stem.bn] + [b.out_bn for b in blocks[:-1]]
    final_bn = blocks[-1].out_bn
    y = F.conv2d(x, model.stem.conv.weight, padding=1)
    raw_outputs = []
    for b, bn1 in zip(blocks, input_bns):
        equal_in_out = b.conv1.in_channels == b.conv1.out_channels and b.conv1.stride == (1, 1)
        a = F.relu(_bn(y, bn1))
        out = F.relu(_bn(F.conv2d(a, b.conv1.weight, stride=b.conv1.stride, padding=1), b.bn2))
        out = F.conv2d(out, b.conv2.weight, padding=1)
        y = out + (y if equal_in_out else F.conv2d(a, b.shortcut.weight, stride=b.shortcut.stride))
        raw_outputs.append(y)
    next_bns = input_bns[1:] + [final_bn]
    taps = [_bn(r, bn) for r, bn in zip(raw_outputs, next_bns)]
    logits = F.linear(F.relu(_bn(y, final_bn)).mean((2, 3)), model.head.fc.weight,
                      model.head.fc.bias)
    n = len(model.groups[0])
    return logits, [taps[i:i + n] for i in range(0, len(taps), n)]


@pytest.mark.parametrize("name", ["resnet8", "resnet14", "resnet8x4", "wrn_16_1", "wrn_16_2"])
def test_features_match_an_independent_reference(name):
    """In float64 (F64: the same convolutions, BatchNorms applied in another way; a float32
    comparison would hold one CPU's rounding through 16 layers)."""
    model = create(name).eval()
    randomize_bn(model)
    model.double()
    x = _image().double()
    reference = _reference_resnet if isinstance(model, CifarResNet) else _reference_wrn
    with torch.no_grad():
        out = model(x, features=True)
        ref_logits, ref_groups = reference(model, x)
    torch.testing.assert_close(out.logits, ref_logits, **F64)
    for group, ref in zip(out.groups, ref_groups):
        assert len(group.layers) == len(ref)
        for t, r in zip(group.layers, ref):
            torch.testing.assert_close(t, r, **F64)


@pytest.mark.parametrize("name", ["resnet14", "wrn_16_1", "wrn_16_2"])
@pytest.mark.parametrize("train", [False, True])
def test_features_are_pre_relu_and_never_modified(name, train):
    model = create(name).train(train)
    randomize_bn(model)
    clones = {}
    for g, blocks in enumerate(model.groups):
        for j, block in enumerate(blocks):  # the block's own output, cloned as it is produced
            block.register_forward_hook(
                lambda m, args, out, key=(g, j): clones.__setitem__(key, out[0].detach().clone()))
    out = model(_image(), features=True)
    (out.logits.sum() + sum(t.sum() for g in out.groups for t in g.layers)).backward()
    for g, group in enumerate(out.groups):
        for j, t in enumerate(group.layers):
            assert t._version == 0, f"{group.names[j]} was modified in place"
            assert torch.equal(t.detach(), clones[(g, j)])
            assert (t < 0).any() and (t > 0).any(), f"{group.names[j]} is not pre-ReLU"


@pytest.mark.parametrize("name", ["resnet14", "resnet8x4"])
def test_resnet_bns_are_bn2_and_produce_the_feature(name):
    model = create(name).eval()
    randomize_bn(model)
    seen = {}
    for blocks in model.groups:
        for b in blocks:
            b.bn2.register_forward_hook(lambda m, a, o: seen.__setitem__(m, o.clone()))
            b.register_forward_pre_hook(lambda m, a: seen.__setitem__(m, a[0].clone()))
    with torch.no_grad():
        out = model(_image(), features=True)
    for group, blocks in zip(out.groups, model.groups):
        for t, bn, b in zip(group.layers, group.bns, blocks):
            assert bn is b.bn2
            a = seen[b]
            shortcut = a if b.downsample is None else b.downsample(a)
            assert torch.equal(t, seen[bn] + shortcut)  # the same float32 operations on the same values


@pytest.mark.parametrize("name", ["wrn_16_1", "wrn_28_2"])
def test_wrn_bns_applied_to_the_raw_block_output_reproduce_the_feature(name):
    model = create(name).eval()
    randomize_bn(model)
    raw = {}
    for blocks in model.groups:
        for b in blocks:
            b.register_forward_hook(lambda m, a, o: raw.__setitem__(m, o[1].clone()))
    with torch.no_grad():
        out = model(_image(), features=True)
        for group, blocks in zip(out.groups, model.groups):
            for t, bn, b in zip(group.layers, group.bns, blocks):
                assert isinstance(bn, nn.BatchNorm2d)
                assert torch.equal(bn(raw[b]), t)
                assert not torch.equal(raw[b], t)
    # every BN that taps a block is the input BN of the next block or the final one: one per block
    assert len({id(bn) for g in out.groups for bn in g.bns}) == sum(map(len, model.groups))


# ---------------------------------------------------------------- forward_from

@pytest.mark.parametrize("name", ["resnet14", "resnet8x4", "wrn_16_1", "wrn_16_2"])
@pytest.mark.parametrize("train", [False, True])
def test_forward_from_equals_the_plain_forward(name, train):
    model = create(name, num_classes=6).train(train)
    randomize_bn(model)
    x = _image()
    with torch.no_grad():
        plain = model(x)
        out = model(x, features=True)
        assert torch.equal(out.logits, plain)
        assert torch.equal(model.forward_from(0, x), plain)
        for g in range(1, model.num_groups + 1):
            h = model.group_input_activation(out.groups[g - 1].last)
            assert torch.equal(model.forward_from(g, h), plain), f"group {g}"


def test_forward_from_rejects_a_bad_group_index():
    model = create("resnet8")
    for bad in (-1, 4):
        with pytest.raises(ModelError, match="0..3"):
            model.forward_from(bad, _image())


@pytest.mark.parametrize("name", ["resnet8", "wrn_16_1"])
def test_gradients_flow_from_the_features_to_the_input(name):
    model = create(name).train()
    x = _image().requires_grad_(True)
    out = model(x, features=True)
    loss = sum(t.pow(2).mean() for t in out.groups[1].layers)
    loss.backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    assert model.stem.conv.weight.grad.abs().sum() > 0
    assert model.head.fc.weight.grad is None  # the head is not on the path of these features


def test_forward_from_is_differentiable_in_its_input():
    model = create("wrn_16_2").train()
    out = model(_image(), features=True)
    h = model.group_input_activation(out.groups[0].last).detach().requires_grad_(True)
    model.forward_from(1, h).logsumexp(1).sum().backward()
    assert h.grad is not None and h.grad.abs().sum() > 0


# ---------------------------------------------------------------- as_tapped and rebuild_record

def _torchvision_resnet18() -> nn.Module:
    import torchvision

    return torchvision.models.resnet18(num_classes=4)


def test_as_tapped_keeps_tapped_networks_and_wraps_torchvision_resnets():
    # trap: no single entry point accepted a network built outside create()
    model = create("resnet8")
    assert as_tapped(model) is model
    inner = _torchvision_resnet18()
    wrapped = as_tapped(inner)
    assert isinstance(wrapped, HookedNetwork) and wrapped.model is inner
    assert wrapped.num_groups == 4


def test_as_tapped_refuses_a_plain_module_in_one_line():
    # trap: a plain module failed later, inside the distiller, with an unrelated error
    with pytest.raises(ModelError) as info:
        as_tapped(nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU()))
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith("Sequential is not a TappedNetwork: wrap it")
    assert "dfa_ext.models.HookedNetwork(model, groups=" in message


@pytest.mark.parametrize("name, kwargs", [
    ("resnet8", {"width": 4}), ("wrn_16_1", {}), ("torchvision:resnet18", {"small_input": True}),
])
def test_rebuild_record_rebuilds_what_create_built(name, kwargs):
    # trap: only model_name was recorded, so options such as width= were lost on rebuild
    model = create(name, num_classes=5, **kwargs)
    assert model.model_options == kwargs
    record = rebuild_record(model)
    assert record == (name, kwargs)
    record[1]["extra"] = 1  # a copy: editing it does not change the model's record
    assert model.model_options == kwargs
    again = create(record[0], num_classes=5, **model.model_options)
    assert [p.shape for p in again.parameters()] == [p.shape for p in model.parameters()]


def test_rebuild_record_is_none_for_networks_create_did_not_build():
    assert rebuild_record(CifarResNet(8)) is None
    assert rebuild_record(HookedNetwork(_torchvision_resnet18())) is None
    wrapped = create("torchvision:resnet18")
    assert rebuild_record(wrapped.model) is None  # the record is on the wrapper
    assert rebuild_record(wrapped) == ("torchvision:resnet18", {})
