"""Networks that expose every block's pre-ReLU feature (the DFA teacher and student contract).

``create(name, ...)`` builds a :class:`TappedNetwork` (a zoo name or "pkg.module:factory"),
``as_tapped(module)`` accepts one built elsewhere; ``forward(x, features=True)`` returns a
:class:`TapOutput`, ``forward_from(g, h)`` resumes at group g; ``pair_networks`` matches a teacher's
groups with a student's and sizes their connectors.
"""

from __future__ import annotations

from .connectors import make_st_connector, make_ts_connector
from .hooked import HookedNetwork, as_tapped, torchvision_resnet_head
from .import_path import is_import_path
from .pairing import GroupPair, GroupShape, pair_networks, probe_groups
from .registry import available_models, create, rebuild_record
from .resnet_cifar import CifarResNet
from .taps import GroupFeatures, TapOutput, TappedNetwork
from .wrn import WideResNet

__all__ = [
    "GroupFeatures", "TapOutput", "TappedNetwork", "CifarResNet", "WideResNet", "HookedNetwork",
    "torchvision_resnet_head", "as_tapped", "create", "is_import_path", "rebuild_record", "available_models",
    "GroupPair", "GroupShape", "pair_networks", "probe_groups", "make_st_connector", "make_ts_connector",
]
