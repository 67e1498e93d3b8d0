"""Networks that expose every block's pre-ReLU feature (the DFA teacher and student contract).

``create(name, ...)`` builds a :class:`TappedNetwork`; ``forward(x, features=True)`` returns a
:class:`TapOutput`, ``forward_from(g, h)`` resumes at group g; ``pair_networks`` matches a teacher's
groups with a student's and sizes their connectors.
"""

from __future__ import annotations

from .connectors import make_st_connector, make_ts_connector
from .hooked import HookedNetwork, torchvision_resnet_head
from .pairing import GroupPair, GroupShape, pair_networks, probe_groups
from .registry import available_models, create
from .resnet_cifar import CifarResNet
from .taps import GroupFeatures, TapOutput, TappedNetwork
from .wrn import WideResNet

__all__ = [
    "GroupFeatures", "TapOutput", "TappedNetwork", "CifarResNet", "WideResNet", "HookedNetwork",
    "torchvision_resnet_head", "create", "available_models", "GroupPair", "GroupShape",
    "pair_networks", "probe_groups", "make_st_connector", "make_ts_connector",
]
