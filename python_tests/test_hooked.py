"""HookedNetwork: the tapped-network contract by hooks, for torchvision ResNets and custom models."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torchvision.models.resnet import Bottleneck

from dfa_ext.errors import ModelError
from dfa_ext.models import HookedNetwork, TapOutput, create
from dfa_helpers import F64, randomize_bn

pytestmark = pytest.mark.usefixtures("one_thread")


def _image(shape=(3, 32, 32), batch=2, seed=0) -> torch.Tensor:
    return torch.randn((batch,) + shape, generator=torch.Generator().manual_seed(seed))


def _manual_block(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """A torchvision block's pre-ReLU output, recomputed without its in-place ReLU on the result."""
    relu = nn.ReLU()
    out = relu(block.bn1(block.conv1(x)))
    if isinstance(block, Bottleneck):
        out = relu(block.bn2(block.conv2(out)))
        out = block.bn3(block.conv3(out))
    else:
        out = block.bn2(block.conv2(out))
    return out + (x if block.downsample is None else block.downsample(x))


def _block_inputs(net: HookedNetwork) -> dict:
    """Hooks cloning every block's input; returns the dict they fill, keyed by layer name."""
    inputs = {}
    for path in (p for g in net._groups for p in g):
        net.model.get_submodule(path).register_forward_pre_hook(
            lambda m, args, path=path: inputs.__setitem__(path, args[0].detach().clone()))
    return inputs


@pytest.fixture(scope="module")
def resnet18() -> HookedNetwork:
    net = create("torchvision:resnet18", num_classes=6, small_input=True).eval()
    randomize_bn(net, weight_spread=1.0)
    return net


@pytest.fixture(scope="module")
def resnet50() -> HookedNetwork:
    net = create("torchvision:resnet50", num_classes=6).eval()
    randomize_bn(net, weight_spread=1.0)
    return net


def test_default_layout_of_torchvision_resnets(resnet18, resnet50):
    assert resnet18.group_names() == ("layer1", "layer2", "layer3", "layer4")
    assert resnet18.num_groups == 4 and isinstance(resnet18.group_input_activation, nn.ReLU)
    with torch.no_grad():
        out = resnet18(_image(), features=True)
        out50 = resnet50(_image(), features=True)
    assert isinstance(out, TapOutput) and out.logits.shape == (2, 6)
    assert out.groups[1].names == ("layer2.0", "layer2.1")
    assert [g.last.shape[1:] for g in out.groups] == [(64, 32, 32), (128, 16, 16), (256, 8, 8),
                                                      (512, 4, 4)]
    assert [len(g.layers) for g in out50.groups] == [3, 4, 6, 3]
    assert [g.last.shape[1:] for g in out50.groups] == [(256, 8, 8), (512, 4, 4), (1024, 2, 2),
                                                        (2048, 1, 1)]
    for net, o, bn_name in ((resnet18, out, "bn2"), (resnet50, out50, "bn3")):
        for group in o.groups:
            for name, bn in zip(group.names, group.bns):
                assert bn is getattr(net.model.get_submodule(name), bn_name)


@pytest.mark.parametrize("which", ["resnet18", "resnet50"])
def test_features_survive_the_in_place_relu(which, request):
    net = request.getfixturevalue(which)
    # float64 (F64): the same modules on the same inputs, the ReLU applied otherwise
    copy_net = copy.deepcopy(net).double()  # the module-scoped fixture must not keep the extra hooks
    with torch.no_grad():  # a first forward teaches the hooks how often each block calls relu;
        copy_net(_image(seed=1).double(), features=True)  # the checked one below clones at the last call only
    inputs = _block_inputs(copy_net)
    x = _image().double()
    with torch.no_grad():
        out = copy_net(x, features=True)
        for group in out.groups:
            for name, t in zip(group.names, group.layers):
                block = copy_net.model.get_submodule(name)
                # the last ReLU call's input: bn3/bn2 + shortcut, not an earlier ReLU's input
                torch.testing.assert_close(t, _manual_block(block, inputs[name]), **F64)
                assert t._version == 0
                assert (t < 0).any(), f"{name} is not pre-ReLU"
        # the block outputs themselves are the ReLU of the features
        for g in range(1, net.num_groups):
            first = out.groups[g].names[0]
            torch.testing.assert_close(inputs[first], torch.relu(out.groups[g - 1].last))


@pytest.mark.parametrize("which", ["resnet18", "resnet50"])
@pytest.mark.parametrize("train", [False, True])
def test_forward_from_equals_the_plain_forward(which, train, request):
    net = request.getfixturevalue(which)
    net.train(train)
    try:
        x = _image()
        with torch.no_grad():
            out = net(x, features=True)
            assert torch.equal(net(x), out.logits)
            assert torch.equal(net.forward_from(0, x), out.logits)
            for g in range(1, net.num_groups + 1):
                h = net.group_input_activation(out.groups[g - 1].last)
                torch.testing.assert_close(net.forward_from(g, h), out.logits, rtol=0, atol=0)
    finally:
        net.eval()


def test_no_stale_tensors_between_calls(resnet18):
    x1, x2 = _image(seed=1), _image(seed=2)
    with torch.no_grad():
        first = resnet18(x1, features=True)
        assert resnet18._stash == {} and not resnet18._capturing
        resnet18(x2)  # features=False: no capture at all
        assert resnet18._stash == {}
        second = resnet18(x2, features=True)
        again = resnet18(x1, features=True)
    for a, b, c in zip(first.groups, second.groups, again.groups):
        for t1, t2, t3 in zip(a.layers, b.layers, c.layers):
            assert not torch.equal(t1, t2)
            assert torch.equal(t1, t3) and t1 is not t3


def test_features_false_records_nothing(resnet18, monkeypatch):
    calls = []
    monkeypatch.setattr(torch.Tensor, "clone", lambda self, *a, **k: calls.append(1))
    with torch.no_grad():
        resnet18(_image())
    assert calls == []


def test_gradients_flow_from_the_features_to_the_input():
    net = create("torchvision:resnet18", in_channels=1, small_input=True).train()
    x = _image((1, 28, 28)).requires_grad_(True)
    out = net(x, features=True)
    assert [g.last.shape[-1] for g in out.groups] == [28, 14, 7, 4]
    sum(t.pow(2).mean() for t in out.groups[2].layers).backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert net.model.conv1.weight.grad.abs().sum() > 0
    assert net.model.layer4[0].conv1.weight.grad is None


# ---------------------------------------------------------------- custom models

class ThreeCalls(nn.Module):
    """Calls its in-place ReLU three times; the pre-ReLU output is the last call's input."""

    def __init__(self, shared: nn.Module | None = None) -> None:
        super().__init__()
        self.bn = nn.BatchNorm2d(2)
        self.relu = shared if shared is not None else nn.ReLU(inplace=True)

    def forward(self, x):
        a = self.relu(x - 1.0)
        b = self.relu(x * 2.0)
        return self.relu(self.bn(a + b - 3.0))


class NoRelu(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 2, 1)

    def forward(self, x):
        return self.conv(x)


class Toy(nn.Module):
    def __init__(self, blocks, skip_last: bool = False) -> None:
        super().__init__()
        self.blocks = nn.Sequential(*blocks)
        self.fc = nn.Linear(2, 3)
        self.skip_last = skip_last

    def forward(self, x):
        for i, block in enumerate(self.blocks):
            if not (self.skip_last and i == len(self.blocks) - 1):
                x = block(x)
        return self.fc(x.mean((2, 3)))


def _toy_head(model, h):
    return model.fc(h.mean((2, 3)))


def test_last_call_semantics_and_a_shared_relu():
    shared = nn.ReLU(inplace=True)
    toy = Toy([ThreeCalls(shared), ThreeCalls(shared)]).eval()
    net = HookedNetwork(toy, [["blocks.0"], ["blocks.1"]], stages=["blocks.0", "blocks.1"],
                        head=_toy_head)
    assert net.group_names() == ("blocks.0", "blocks.1")
    for seed in (0, 1):  # the first forward counts the relu calls, the second uses the count
        _check_three_calls(net, toy, _image((2, 4, 4), seed=seed))


def _check_three_calls(net, toy, x):
    with torch.no_grad():
        out = net(x, features=True)
        b0, b1 = toy.blocks
        first = b0.bn(torch.relu(x - 1) + torch.relu(2 * x) - 3)
        torch.testing.assert_close(out.groups[0].last, first)
        h = torch.relu(first)
        second = b1.bn(torch.relu(h - 1) + torch.relu(2 * h) - 3)
        torch.testing.assert_close(out.groups[1].last, second)
        assert out.groups[0].bns == (b0.bn,)
        for g in range(3):
            inp = x if g == 0 else net.group_input_activation(out.groups[g - 1].last)
            assert torch.equal(net.forward_from(g, inp), out.logits)


def test_tap_output_true_taps_the_block_output():
    # trap: a block without `relu` used to fall back to its output silently; now only on request
    net = HookedNetwork(Toy([NoRelu(), NoRelu()]), [["blocks.0"], ["blocks.1"]],
                        stages=["blocks.0", "blocks.1"], head=_toy_head, tap_output=True)
    assert isinstance(net.group_input_activation, nn.Identity)
    x = _image((2, 4, 4))
    out = net(x, features=True)
    torch.testing.assert_close(out.groups[0].last, net.model.blocks[0](x))
    assert out.groups[0].bns == (None,)
    assert torch.equal(net.forward_from(1, out.groups[0].last), out.logits)


class FunctionalRelu(nn.Module):
    """Ends in F.relu: its output is post-activation and it has no module to hook."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 2, 1)
        self.bn = nn.BatchNorm2d(2)

    def forward(self, x):
        return torch.nn.functional.relu(self.bn(self.conv(x)))


def test_a_block_calling_f_relu_is_refused():
    # trap: the output-tap fallback gave post-ReLU "features" (min 0.0) without a word
    with pytest.raises(ModelError) as info:
        HookedNetwork(Toy([FunctionalRelu(), FunctionalRelu()]), [["blocks.0"], ["blocks.1"]])
    message = str(info.value)
    assert "\n" not in message
    assert "'blocks.0'" in message and "F.relu" in message
    assert "tap_output=True" in message and "relu=" in message


def test_an_activation_other_than_relu_is_refused():
    # the group input activation of the teacher-to-student path, and the OFD margins, are ReLU's:
    # a GELU block tapped at its activation would silently get both wrong
    class GeluBlock(nn.Sequential):
        def __init__(self) -> None:
            super().__init__(nn.Conv2d(2, 2, 1), nn.BatchNorm2d(2), nn.GELU())

    with pytest.raises(ModelError, match=r"'blocks.0': its '2' module is a GELU, not an nn.ReLU") as info:
        HookedNetwork(Toy([GeluBlock()]), [["blocks.0"]], relu="2")
    assert "\n" not in str(info.value)


def test_tap_output_lists_blocks_and_checks_them():
    # trap: tap_output must name real blocks; one listed block is output-tapped, the rest at relu
    toy = Toy([NoRelu(), ThreeCalls()]).eval()
    net = HookedNetwork(toy, [["blocks.0", "blocks.1"]], tap_output=["blocks.0"])
    x = _image((2, 4, 4))
    with torch.no_grad():
        out = net(x, features=True)
        torch.testing.assert_close(out.groups[0].layers[0], toy.blocks[0](x))
    assert out.groups[0].bns == (None, toy.blocks[1].bn)
    for bad, match in (("blocks.0", r"\['blocks.0'\]"), (["blocks.7"], "blocks.7")):
        with pytest.raises(ModelError, match=match):
            HookedNetwork(Toy([NoRelu()]), [["blocks.0"]], tap_output=bad)


class SeqBlock(nn.Sequential):
    def __init__(self) -> None:
        super().__init__(nn.Conv2d(2, 2, 1), nn.BatchNorm2d(2), nn.ReLU())


def test_relu_names_the_activation_inside_a_sequential_block():
    # trap: a Sequential block has no `relu` attribute; relu="2" taps the input of its nn.ReLU
    toy = Toy([SeqBlock(), SeqBlock()]).eval()
    randomize_bn(toy, weight_spread=1.0)
    net = HookedNetwork(toy, [["blocks.0"], ["blocks.1"]], stages=["blocks.0", "blocks.1"],
                        head=_toy_head, relu="2")
    assert isinstance(net.group_input_activation, nn.ReLU)
    x = _image((2, 4, 4))
    with torch.no_grad():
        out = net(x, features=True)
        b0, b1 = toy.blocks
        first = b0[1](b0[0](x))
        torch.testing.assert_close(out.groups[0].last, first)
        torch.testing.assert_close(out.groups[1].last, b1[1](b1[0](torch.relu(first))))
        assert out.groups[0].last.min() < 0
        assert out.groups[0].bns[0] is b0[1] and out.groups[1].bns[0] is b1[1]
        assert torch.equal(net.forward_from(1, net.group_input_activation(first)), out.logits)
    with pytest.raises(ModelError, match="'blocks.0' has no 'act'"):
        HookedNetwork(toy, [["blocks.0"], ["blocks.1"]], relu="act")


class CifarBlock(nn.Module):
    """A CIFAR-style BasicBlock whose projection is `shortcut`, registered after bn2."""

    def __init__(self, c_in: int = 2, c_out: int = 3) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class CifarToy(nn.Module):
    def __init__(self, block0: nn.Module, block1: nn.Module) -> None:
        super().__init__()
        self.layer1, self.layer2 = block0, block1
        self.fc = nn.Linear(3, 2)

    def forward(self, x):
        return self.fc(self.layer2(self.layer1(x)).mean((2, 3)))


def _cifar_net(**kwargs) -> HookedNetwork:
    return HookedNetwork(CifarToy(CifarBlock(2, 3), CifarBlock(3, 3)), [["layer1"], ["layer2"]],
                         **kwargs)


def test_a_shortcut_named_projection_does_not_supply_the_margin_bn():
    # trap: "the last BN not under downsample" picked shortcut.1, the shortcut's BN
    net = _cifar_net()
    with torch.no_grad():
        out = net(_image((2, 4, 4)), features=True)
    for g, name in enumerate(("layer1", "layer2")):
        block = net.model.get_submodule(name)
        assert out.groups[g].bns[0] is block.bn2


class TwoBranches(nn.Module):
    """BNs in two children with neutral names: which is the main path cannot be told."""

    def __init__(self) -> None:
        super().__init__()
        self.main = nn.Sequential(nn.Conv2d(2, 2, 1), nn.BatchNorm2d(2))
        self.side = nn.Sequential(nn.Conv2d(2, 2, 1), nn.BatchNorm2d(2))
        self.relu = nn.ReLU()

    def forward(self, x):
        return self.relu(self.main(x) + self.side(x))


def test_ambiguous_nested_bns_are_refused_unless_margin_bn_names_one():
    # trap: the automatic rule silently picked the last BN in registration order (side.1)
    with pytest.raises(ModelError) as info:
        HookedNetwork(Toy([TwoBranches()]), [["blocks.0"]])
    message = str(info.value)
    assert "\n" not in message and "'blocks.0'" in message and "margin_bn=" in message
    net = HookedNetwork(Toy([TwoBranches()]), [["blocks.0"]], margin_bn="main.1")
    with torch.no_grad():
        out = net(_image((2, 2, 2)), features=True)
    assert out.groups[0].bns[0] is net.model.blocks[0].main[1]


def test_margin_bn_as_a_path_and_as_a_mapping():
    # trap: no way to say which BN a feature is the output of
    net = _cifar_net(margin_bn="bn1")
    with torch.no_grad():
        out = net(_image((2, 4, 4)), features=True)
    assert [g.bns[0] for g in out.groups] == [net.model.layer1.bn1, net.model.layer2.bn1]
    net = _cifar_net(margin_bn={"layer1": "shortcut.1"})  # layer2: automatic
    with torch.no_grad():
        out = net(_image((2, 4, 4)), features=True)
    assert out.groups[0].bns[0] is net.model.layer1.shortcut[1]
    assert out.groups[1].bns[0] is net.model.layer2.bn2
    # an output-tapped block has no BN unless one is named
    net = HookedNetwork(Toy([NoRelu()]), [["blocks.0"]], tap_output=True)
    assert net(_image((2, 2, 2)), features=True).groups[0].bns == (None,)


@pytest.mark.parametrize("margin_bn, match", [
    ("bn9", "margin_bn: block 'layer1' has no module 'bn9'"),
    ("conv1", "layer1.conv1 is a Conv2d, not a BatchNorm"),
    ({"layer3": "bn2"}, r"margin_bn names \['layer3'\]"),
    (3, "margin_bn must be"),
])
def test_bad_margin_bn_is_refused(margin_bn, match):
    # trap: a mistyped margin_bn must not fall back to the automatic choice
    with pytest.raises(ModelError, match=match) as info:
        _cifar_net(margin_bn=margin_bn)
    assert "\n" not in str(info.value)


class ReluNoBn(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x):
        return self.relu(x - 0.5)


def test_a_block_with_relu_but_no_bn_is_tapped_before_its_relu():
    net = HookedNetwork(Toy([ReluNoBn()]), [["blocks.0"]])
    x = _image((2, 4, 4))
    out = net(x, features=True)
    assert torch.equal(out.groups[0].last, x - 0.5) and out.groups[0].bns == (None,)


def test_a_block_that_did_not_run_is_an_error_not_stale_data():
    toy = Toy([ThreeCalls(), ThreeCalls()])
    net = HookedNetwork(toy, [["blocks.0", "blocks.1"]])
    net(_image((2, 4, 4)), features=True)
    toy.skip_last = True
    with pytest.raises(ModelError, match="blocks.1"):
        net(_image((2, 4, 4)), features=True)
    assert net._stash == {} and net._active == []
    with pytest.raises(ModelError, match="stages"):
        net.forward_from(1, _image((2, 4, 4)))


@pytest.mark.parametrize("args, kwargs, match", [
    ((Toy([NoRelu()]),), {}, "pass `groups`"),
    ((Toy([NoRelu()]), [["blocks.5"]]), {}, "no block"),
    ((Toy([NoRelu()]), [[]]), {}, "at least one block"),
    ((Toy([NoRelu(), NoRelu()]), [["blocks.0"], ["blocks.0"]]), {"tap_output": True}, "twice"),
    ((Toy([NoRelu(), ThreeCalls()]), [["blocks.0"], ["blocks.1"]]), {"tap_output": ["blocks.0"]},
     "all be tapped at their 'relu' module or all at their output"),
    ((Toy([ThreeCalls()]), [["blocks.0"]]), {"relu": ""}, "relu must be the path"),
])
def test_bad_groupings(args, kwargs, match):
    with pytest.raises(ModelError, match=match):
        HookedNetwork(*args, **kwargs)


def test_deepcopy_records_into_the_copy(resnet18):
    clone = copy.deepcopy(resnet18)
    x = _image()
    with torch.no_grad():
        out = clone(x, features=True)
        ref = resnet18(x, features=True)
    for a, b in zip(out.groups, ref.groups):
        assert all(torch.equal(s, t) for s, t in zip(a.layers, b.layers))
        assert a.bns[0] is not b.bns[0]
        assert a.bns[0] is clone.model.get_submodule(a.names[0]).bn2
