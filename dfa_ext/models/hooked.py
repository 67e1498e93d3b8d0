"""The network contract for models the package did not define (e.g. torchvision ResNets), by hooks.

Each block's pre-ReLU output is caught by a forward *pre*-hook on its activation module (``relu=``,
default the block's ``relu``), which records a clone of the input (the ReLU is usually in place,
and the block may call it several times: a torchvision BasicBlock twice, a Bottleneck three times;
the last call's input is the block's pre-ReLU output, so the last call wins).

A block without that module is refused: its output may already be post-activation (a block that
calls ``F.relu``), which would silently give features >= 0.  ``tap_output=`` says explicitly that a
block's output is the pre-activation feature; a clone of the output is then the tap, and the
network's group activation is the identity.

The BN whose output each feature is (the OFD margin source) is ``margin_bn=``, or found: the
block's last BatchNorm outside its shortcut branch (a child named downsample, shortcut, skip, proj,
projection or residual).  A block whose BNs sit in several other children is refused, since the
main path cannot be told from the shortcut there.

Hooks only record while ``forward(x, features=True)`` runs, and everything they recorded is
dropped before it returns, so nothing leaks into the next call.  The record lives on this module,
so use one process per replica (DistributedDataParallel), not DataParallel.
"""

from __future__ import annotations

import functools
from typing import Callable, Dict, List, Mapping, Optional, Sequence, Set, Tuple, Union

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


def _is_batchnorm(module: nn.Module) -> bool:
    return isinstance(module, nn.modules.batchnorm._BatchNorm)


# Children that hold a block's projection shortcut (torchvision ``downsample``, CIFAR ``shortcut``):
# their BN normalises the shortcut, not the main path, so it is never the margin source.
SHORTCUT_NAMES = ("downsample", "shortcut", "skip", "proj", "projection", "residual")


def _auto_margin_bn(path: str, block: nn.Module) -> Optional[nn.Module]:
    """The block's last BatchNorm outside its shortcut branch (bn2 / bn3 in torchvision), or None
    when it has none.  Refuses a block whose BNs lie in several children (or in a child and the
    block itself): any of those children may be an unnamed shortcut."""
    direct: List[nn.Module] = []
    nested: Dict[str, List[nn.Module]] = {}
    for sub, module in block.named_modules():
        if not sub or not _is_batchnorm(module):
            continue
        child, _, rest = sub.partition(".")
        if child in SHORTCUT_NAMES:
            continue
        (nested.setdefault(child, []) if rest else direct).append(module)
    if not nested:
        return direct[-1] if direct else None
    if len(nested) == 1 and not direct:  # the whole main path is one child (a Sequential body)
        return next(iter(nested.values()))[-1]
    where = sorted(nested) + (["the block itself"] if direct else [])
    raise ModelError(f"block {path!r} has BatchNorms in {where}, so its main path cannot be told "
                     f"from its shortcut: name the BN of the tapped feature with margin_bn= "
                     f"(a path inside the block, or {{{path!r}: 'bn2'}})")


def _named_bn(path: str, block: nn.Module, bn_path: str) -> nn.Module:
    """The BatchNorm ``bn_path`` inside ``block`` (an explicit ``margin_bn``)."""
    try:
        bn = block.get_submodule(bn_path) if bn_path else None
    except AttributeError:
        bn = None
    if bn is None:
        raise ModelError(f"margin_bn: block {path!r} has no module {bn_path!r}; pass the path of "
                         "a BatchNorm inside the block (e.g. 'bn2')")
    if not _is_batchnorm(bn):
        raise ModelError(f"margin_bn: {path}.{bn_path} is a {type(bn).__name__}, not a BatchNorm; "
                         "pass the path of the BN whose output the tapped feature is")
    return bn


def _output_tapped_blocks(tap_output: Union[bool, Sequence[str]], blocks: Sequence[str]) -> Set[str]:
    """The blocks named by ``tap_output`` (True: all of them)."""
    if isinstance(tap_output, bool):
        return set(blocks) if tap_output else set()
    if isinstance(tap_output, str):
        raise ModelError(f"tap_output takes True/False or a list of block paths, got the string "
                         f"{tap_output!r}: pass [{tap_output!r}]")
    unknown = [p for p in tap_output if p not in blocks]
    if unknown:
        raise ModelError(f"tap_output names {unknown}, which are not blocks of `groups`; pass "
                         "paths listed in groups")
    return set(tap_output)


def _tapped_or_none(module: nn.Module) -> Optional[TappedNetwork]:
    """``module`` itself when tapped, a torchvision-style ResNet wrapped, else None."""
    if isinstance(module, TappedNetwork):
        return module
    if _is_torchvision_resnet(module):
        return HookedNetwork(module)
    return None


def as_tapped(module: nn.Module) -> TappedNetwork:
    """``module`` as a :class:`TappedNetwork`: itself when it is one, a torchvision-style ResNet
    (layer1..layer4, avgpool, fc) wrapped in :class:`HookedNetwork`; anything else is refused."""
    tapped = _tapped_or_none(module)
    if tapped is None:
        raise ModelError(f"{type(module).__name__} is not a TappedNetwork: wrap it, e.g. "
                         "dfa_ext.models.HookedNetwork(model, groups=[['layer1.0', ...], ...]) "
                         "with stages= and head= for forward_from")
    return tapped


class HookedNetwork(TappedNetwork):
    """Wraps ``model`` so it follows the :class:`TappedNetwork` contract.

    Args:
        model: the network; ``model(x)`` -> logits [B, num_classes] for x [B, C_in, H, W].
        groups: per layer group, the module paths of its blocks (each one tapped layer).  Defaults
            for a torchvision ResNet to the blocks of layer1..layer4 (G = 4).
        stages: per group, the module path that maps the group's input to its (activated) output;
            needed by ``forward_from(g >= 1, h)``.  Default for a torchvision ResNet: layer1..4.
        head: ``head(model, h)`` -> logits [B, num_classes] from the last stage's output; needed
            by ``forward_from(g >= 1, h)``.  Default for a torchvision ResNet: avgpool, flatten, fc.
        group_names: one name per group (default: the stage paths, else "group{g}").
        relu: path, inside every block, of the activation module whose input (at its last call
            within the block) is the tap, e.g. "2" for ``nn.Sequential(conv, bn, nn.ReLU())``.
            A block without it is refused unless ``tap_output`` names it.
        tap_output: True, or a list of block paths: tap those blocks' output instead, for blocks
            whose output is the pre-activation feature.  The groups' last blocks must all be
            relu-tapped (group activation ReLU) or all output-tapped (identity).
        margin_bn: the BN, as a path inside the block, whose output the tapped feature is (its
            OFD margin source): one path for every block, or a mapping block path -> BN path
            (blocks not in it are found automatically).  None: the block's last BN outside a
            shortcut child (downsample, shortcut, skip, proj, projection, residual); an
            output-tapped block then has no known BN (``GroupFeatures.bns`` entry None).
    """

    def __init__(self, model: nn.Module, groups: Optional[Sequence[Sequence[str]]] = None, *,
                 stages: Optional[Sequence[str]] = None, head: Optional[Head] = None,
                 group_names: Optional[Sequence[str]] = None, relu: str = "relu",
                 tap_output: Union[bool, Sequence[str]] = False,
                 margin_bn: Union[str, Mapping[str, str], None] = None) -> None:
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
        if not isinstance(relu, str) or not relu:
            raise ModelError(f"relu must be the path of the activation module inside each block "
                             f"(e.g. 'relu' or '2'), got {relu!r}")

        self._capturing = False
        self._stash: Dict[str, Tensor] = {}
        self._active: List[str] = []  # blocks currently running, innermost last
        self._bns: Dict[str, Optional[nn.Module]] = {}
        blocks = [p for g in self._groups for p in g]
        self._output_tapped = _output_tapped_blocks(tap_output, blocks)  # tapped at their output
        # relu calls per block: counted in this forward, and learned from the first one so that
        # later forwards clone only at the last call (a BasicBlock's first clone is wasted work)
        self._calls: Dict[str, int] = {}
        self._calls_per_block: Dict[str, int] = {}
        self._register_hooks(blocks, relu, margin_bn)
        last_relu_tapped = {g[-1] not in self._output_tapped for g in self._groups}
        if len(last_relu_tapped) != 1:
            raise ModelError(f"the groups' last blocks must all be tapped at their {relu!r} module "
                             "or all at their output (tap_output=); it decides the group input "
                             "activation")
        self.group_input_activation = nn.ReLU() if last_relu_tapped.pop() else nn.Identity()

    def _register_hooks(self, blocks: Sequence[str], relu: str,
                        margin_bn: Union[str, Mapping[str, str], None]) -> None:
        """Hooks every block, and the activation module of those tapped at it; finds their BNs."""
        if isinstance(margin_bn, Mapping):
            unknown = [p for p in margin_bn if p not in blocks]
            if unknown:
                raise ModelError(f"margin_bn names {unknown}, which are not blocks of `groups`; "
                                 "key it by paths listed in groups")
        elif margin_bn is not None and not isinstance(margin_bn, str):
            raise ModelError(f"margin_bn must be a BN path, a mapping block path -> BN path or "
                             f"None, got {type(margin_bn).__name__}")
        hooked_relus = set()
        for path in blocks:
            if path in self._bns:
                raise ModelError(f"block {path!r} is listed twice in groups")
            try:
                block = self.model.get_submodule(path)
            except AttributeError as e:
                raise ModelError(f"the model has no block {path!r}: {e}") from None
            act = None
            if path not in self._output_tapped:
                try:
                    act = block.get_submodule(relu)
                except AttributeError:
                    raise ModelError(
                        f"block {path!r} has no {relu!r} module to hook, and its output may "
                        "already be post-activation (F.relu): give the block an nn.ReLU module "
                        "(and name it with relu=...), or pass tap_output=True (or a list of block "
                        "paths) if its output is the pre-activation feature") from None
                if not isinstance(act, nn.ReLU):  # the margins and the group input activation are ReLU's
                    raise ModelError(
                        f"block {path!r}: its {relu!r} module is a {type(act).__name__}, not an nn.ReLU; "
                        "DFA's OFD margins and the teacher-to-student path assume ReLU (pass tap_output= "
                        "for blocks whose output is the pre-activation feature)")
            bn_path = margin_bn.get(path) if isinstance(margin_bn, Mapping) else margin_bn
            if bn_path is not None:
                self._bns[path] = _named_bn(path, block, bn_path)
            else:  # an output-tapped block's output need not be a BN's: unknown unless named
                self._bns[path] = None if act is None else _auto_margin_bn(path, block)
            # Bound methods and partials (not closures), so deepcopy re-targets them at the copy.
            block.register_forward_pre_hook(functools.partial(self._enter_block, path))
            block.register_forward_hook(functools.partial(self._exit_block, path))
            if act is not None and id(act) not in hooked_relus:  # shared: hook once
                hooked_relus.add(id(act))
                act.register_forward_pre_hook(self._on_relu)

    def _enter_block(self, path: str, module: nn.Module, args) -> None:
        if self._capturing:
            self._active.append(path)
            self._calls[path] = 0

    def _exit_block(self, path: str, module: nn.Module, args, output) -> None:
        if not self._capturing:
            return
        self._active.pop()
        if path in self._output_tapped and isinstance(output, Tensor):  # tap_output: the output
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
