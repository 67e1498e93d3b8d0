"""The network contract for models the package did not define (e.g. torchvision ResNets), by hooks.

Each block's pre-ReLU output is caught by a forward *pre*-hook on its ``relu`` module, which
records a clone of the input (the ReLU is usually in place, and the block may call it several
times: a torchvision BasicBlock twice, a Bottleneck three times; the last call's input is the
block's pre-ReLU output, so the last call wins).  A block without a ``relu`` module falls back to
a clone of its output, and the network's group activation is then the identity.

Hooks only record while ``forward(x, features=True)`` runs, and everything they recorded is
dropped before it returns, so nothing leaks into the next call.  The record lives on this module,
so use one process per replica (DistributedDataParallel), not DataParallel.
"""

from __future__ import annotations

import functools
from typing import Callable, Dict, List, Optional, Sequence, Set, Tuple, Union

import torch
from torch import Tensor, nn

from ..errors import ModelError
from .taps import GroupFeatures, TapOutput, TappedNetwork

Head = Callable[[nn.Module, Tensor], Tensor]


def torchvision_resnet_head(model: nn.Module, h: Tensor) -> Tensor:
    """avgpool, flatten, fc of a torchvision ResNet: [B, C, H, W] -> [B, num_classes]."""
    return model.fc(torch.flatten(model.avgpool(h), 1))


def _is_torchvision_resnet(model: nn.Module) -> bool:
    names = ("layer1", "layer2", "layer3", "layer4", "avgpool", "fc")
    return all(isinstance(getattr(model, n, None), nn.Module) for n in names)


def _margin_bn(block: nn.Module) -> Optional[nn.Module]:
    """The block's last BatchNorm outside its ``downsample`` branch (bn2 / bn3 in torchvision)."""
    found = None
    for path, module in block.named_modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and \
                not (path == "downsample" or path.startswith("downsample.")):
            found = module
    return found


class HookedNetwork(TappedNetwork):
    """Wraps ``model`` so it follows the :class:`TappedNetwork` contract.

    groups: per layer group, the module paths of its blocks (each one tapped layer).  Defaults
        for a torchvision ResNet to the blocks of layer1..layer4 (G = 4).
    stages: per group, the module path that maps the group's input to its (activated) output,
        and head: ``head(model, h)`` -> logits; both are needed by ``forward_from(g >= 1, h)`` and
        default to layer1..layer4 and avgpool-flatten-fc for a torchvision ResNet.
    group_names: one name per group (default: the stage paths, else "group{g}").
    """

    def __init__(self, model: nn.Module, groups: Optional[Sequence[Sequence[str]]] = None, *,
                 stages: Optional[Sequence[str]] = None, head: Optional[Head] = None,
                 group_names: Optional[Sequence[str]] = None) -> None:
        super().__init__()
        self.model = model
        if groups is None:
            if not _is_torchvision_resnet(model):
                raise ModelError(f"{type(model).__name__} is not a torchvision-style ResNet "
                                 "(layer1..layer4, avgpool, fc): pass `groups`")
            stages = [f"layer{i}" for i in range(1, 5)] if stages is None else stages
            groups = [[f"{s}.{name}" for name, _ in model.get_submodule(s).named_children()]
                      for s in stages]
            head = torchvision_resnet_head if head is None else head
        if not groups or any(len(g) == 0 for g in groups):
            raise ModelError(f"every layer group needs at least one block, got {groups}")
        if stages is not None and len(stages) != len(groups):
            raise ModelError(f"{len(stages)} stages given for {len(groups)} groups")
        self._groups: Tuple[Tuple[str, ...], ...] = tuple(tuple(g) for g in groups)
        self._stages = None if stages is None else tuple(stages)
        self._head = head
        if group_names is None:
            group_names = self._stages or [f"group{g}" for g in range(len(self._groups))]
        if len(group_names) != len(self._groups):
            raise ModelError(f"{len(group_names)} group names given for {len(self._groups)} groups")
        self._group_names = tuple(group_names)

        self._capturing = False
        self._stash: Dict[str, Tensor] = {}
        self._active: List[str] = []  # blocks currently running, innermost last
        self._bns: Dict[str, Optional[nn.Module]] = {}
        self._no_relu: Set[str] = set()  # blocks tapped at their output instead
        # relu calls per block: counted in this forward, and learned from the first one so that
        # later forwards clone only at the last call (a BasicBlock's first clone is wasted work)
        self._calls: Dict[str, int] = {}
        self._calls_per_block: Dict[str, int] = {}
        self._register_hooks()
        last_has_relu = {g[-1] not in self._no_relu for g in self._groups}
        if len(last_has_relu) != 1:
            raise ModelError("the groups' last blocks must all have a `relu` module or all lack "
                             "one (it decides the group input activation)")
        self.group_input_activation = nn.ReLU() if last_has_relu.pop() else nn.Identity()

    def _register_hooks(self) -> None:
        """Hooks every block, and the ``relu`` module of those that have one."""
        hooked_relus = set()
        for path in (p for g in self._groups for p in g):
            if path in self._bns:
                raise ModelError(f"block {path!r} is listed twice in groups")
            try:
                block = self.model.get_submodule(path)
            except AttributeError as e:
                raise ModelError(f"the model has no block {path!r}: {e}") from None
            relu = getattr(block, "relu", None)
            if not isinstance(relu, nn.Module):
                self._no_relu.add(path)
            self._bns[path] = None if path in self._no_relu else _margin_bn(block)
            # Bound methods and partials (not closures), so deepcopy re-targets them at the copy.
            block.register_forward_pre_hook(functools.partial(self._enter_block, path))
            block.register_forward_hook(functools.partial(self._exit_block, path))
            if path not in self._no_relu and id(relu) not in hooked_relus:  # shared: hook once
                hooked_relus.add(id(relu))
                relu.register_forward_pre_hook(self._on_relu)

    def _enter_block(self, path: str, module: nn.Module, args) -> None:
        if self._capturing:
            self._active.append(path)
            self._calls[path] = 0

    def _exit_block(self, path: str, module: nn.Module, args, output) -> None:
        if not self._capturing:
            return
        self._active.pop()
        if path in self._no_relu and isinstance(output, Tensor):  # no relu: the output itself
            self._stash[path] = output.clone()
            return
        calls = self._calls.pop(path, 0)
        expected = self._calls_per_block.setdefault(path, calls)
        if calls != expected:
            raise ModelError(f"block {path!r} called its relu {calls} times, {expected} times before: "
                             "the hooks need a fixed number of calls per block")

    def _on_relu(self, module: nn.Module, args) -> None:
        if self._capturing and self._active:
            path = self._active[-1]
            self._calls[path] += 1
            expected = self._calls_per_block.get(path)
            # In place ReLU: clone now. The last call's input is the block's pre-ReLU output; until
            # the count is known every call clones and a later one overwrites.
            if expected is None or self._calls[path] == expected:
                self._stash[path] = args[0].clone()

    def group_names(self) -> Tuple[str, ...]:
        return self._group_names

    def forward(self, x: Tensor, features: bool = False) -> Union[Tensor, TapOutput]:
        if not features:
            return self.model(x)
        self._capturing = True  # the record is empty: every call ends by dropping it
        try:
            logits = self.model(x)
            stash = self._stash
        finally:
            self._stash, self._active, self._calls, self._capturing = {}, [], {}, False
        taps = []
        for g, paths in enumerate(self._groups):
            missing = [p for p in paths if p not in stash]
            if missing:
                raise ModelError(f"blocks {missing} of group {self._group_names[g]!r} did not "
                                 "run (or did not call their relu) during the forward pass")
            taps.append(GroupFeatures(tuple(stash[p] for p in paths), paths,
                                      tuple(self._bns[p] for p in paths)))
        return TapOutput(logits, tuple(taps))

    def forward_from(self, group_index: int, h: Tensor) -> Tensor:
        self._check_group_index(group_index)
        if group_index == 0:
            return self.forward(h)
        if self._stages is None or self._head is None:
            raise ModelError("forward_from(g >= 1) needs the `stages` and `head` of the network")
        for path in self._stages[group_index:]:
            h = self.model.get_submodule(path)(h)
        return self._head(self.model, h)
