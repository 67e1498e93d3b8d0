"""Stage 1 as an object a training loop drives: :class:`AggregationSearch`.

``dfa search`` (:func:`~dfa_ext.search.searcher.run_search`) drives it with the package's data
streams, checkpoints and progress; a user's loop drives the same object with its own batches, so
the recipe (warm-up, beta's Adam, the weights' cosine-decayed SGD, the clips) has one definition,
:class:`~dfa_ext.search.config.SearchConfig`'s defaults.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import torch
from torch import Tensor, nn

from .. import models
from ..errors import ConfigError
from ..margins import teacher_margins
from ..training.distributed import DistContext, current_context, wrap_ddp
from ..training.finite import SEARCH_HINT, FiniteGuard
from ..training.networks import network_label, network_record
from ..training.optim_step import optimizer_step
from ..training.run_options import autocast_for, resolve_device
from ..training.schedule import LrSchedule
from ..training.teacher import freeze
from .architect import Architect, Batch
from .config import SearchConfig
from .network import SearchNetwork, teacher_features
from .result import SearchResult
from .trajectory import AlphaTrajectory


class AggregationSearch:
    """Searches, group by group, how to mix each teacher group's layers (method.md section 5).

    Each :meth:`step` takes one search-train batch and one search-val batch: first beta's step on
    the val batch (after the group's warm-up), then the weights' step (student and connectors) on
    the train batch. The group being searched advances every ``steps_per_group`` steps; when
    :attr:`done`, :meth:`result` is the aggregation that :class:`~dfa_ext.DFALoss` and
    ``dfa distill --method dfa`` use::

        search = AggregationSearch(teacher, student, input_shape=(1, 28, 28), steps_per_group=200)
        while not search.done:
            search.step(next(train_batches), next(val_batches))
        result = search.result()

    The student is trained in place (pass a copy to keep yours fresh: ``copy.deepcopy``); the
    teacher is frozen and put in eval mode. Both move to ``config.device``.

    Args:
        teacher, student: trained teacher and student to search for (TappedNetworks, torchvision-style
            ResNets, or modules wrapped in ``dfa_ext.models.HookedNetwork``).
        input_shape: (C, H, W) of the images.
        config: the search settings (default ``SearchConfig()``: the recipe measured in the README;
            its data, output and checkpoint options are not used here).
        steps_per_epoch: search-train batches per epoch; needed only by ``epochs_per_group``.
        **options: SearchConfig fields overriding ``config``'s (e.g. ``steps_per_group=200``).
    """

    def __init__(self, teacher: nn.Module, student: nn.Module, input_shape: Sequence[int], *,
                 config: SearchConfig | None = None, steps_per_epoch: int | None = None,
                 dist: DistContext | None = None, **options: Any) -> None:
        config = config or SearchConfig()
        unknown = sorted(set(options) - {f.name for f in dataclasses.fields(SearchConfig)})
        if unknown:
            raise ConfigError(f"unknown search option{'s' if len(unknown) > 1 else ''} {unknown}; see SearchConfig")
        config = dataclasses.replace(config, **options)
        config.validate(teacher_given=True, student_given=True)
        self.config, self.dist = config, dist or current_context()
        self.device = resolve_device(config.device)
        self.input_shape = tuple(int(d) for d in input_shape)
        self.teacher = freeze(models.as_tapped(teacher))
        self.student = models.as_tapped(student)
        self.pairs = models.pair_networks(self.teacher, self.student, self.input_shape)
        pairs = self.pairs
        self.groups = list(config.groups) or list(range(len(pairs)))
        if any(not 0 <= g < len(pairs) for g in self.groups) or len(set(self.groups)) != len(self.groups):
            raise ConfigError(f"groups must be distinct indices in 0..{len(pairs) - 1}, got {list(config.groups)}")
        if config.epochs_per_group is not None and steps_per_epoch is None:
            raise ConfigError("epochs_per_group needs steps_per_epoch (search-train batches per epoch); "
                              "or give steps_per_group")
        self.steps_per_group, self.warmup_steps = config.group_steps(steps_per_epoch or 1)
        self.total_steps = self.steps_per_group * len(self.groups)

        margins = teacher_margins(self.teacher, self.input_shape) \
            if config.objective == "distill" or config.ts_margins else None
        self.net = SearchNetwork(self.student, pairs, kernels=config.kernels, objective=config.objective,
                                 gamma_st=config.gamma_st, gamma_ts=config.gamma_ts, gamma_fd=config.gamma_fd,
                                 margins=margins, ts_margins=config.ts_margins)
        self.betas = nn.ParameterList(nn.Parameter(config.beta_init_std * torch.randn(p.num_layers)) for p in pairs)
        self.memory_format = config.memory_format_for(self.net, self.device)
        # Same layout as the student: the TS path feeds teacher features into the student's later
        # groups, and a channels_last input would put the student's convolutions back in channels_last.
        self.teacher.to(self.device, memory_format=self.memory_format)
        self.net.to(self.device, memory_format=self.memory_format)
        self.betas.to(self.device)

        self.autocast = autocast_for(config.amp, self.device)
        self.weight_optimizer = torch.optim.SGD(self.net.parameters(), lr=config.lr, momentum=config.momentum,
                                                weight_decay=config.weight_decay)
        self._schedule = LrSchedule(config.lr - config.lr_min, self.total_steps, "cosine")  # + lr_min
        self.architect = Architect(self.net, self.betas, lr=config.arch_lr, adam_betas=config.arch_betas,
                                   weight_decay=config.arch_weight_decay, second_order=config.order == "second",
                                   fd_radius=config.fd_radius, grad_clip=config.arch_grad_clip,
                                   autocast=self.autocast, dist=self.dist)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=config.amp == "fp16")
        # Two guards: beta and the weights are two updates each step, dropped separately in skip mode;
        # only the weights' step goes through the gradient scaler.
        self.arch_guard = FiniteGuard(config.on_nonfinite, config.max_consecutive_skips, self.device,
                                      dist=self.dist, hint=SEARCH_HINT)
        self.weight_guard = FiniteGuard(config.on_nonfinite, config.max_consecutive_skips, self.device,
                                        loss_scaling=self.scaler.is_enabled(), dist=self.dist, hint=SEARCH_HINT)
        # Only one group's connectors take part in a step, hence find_unused_parameters. --compile:
        # the weight step (one graph per group); the architecture step, which perturbs the weights
        # in place (second order) and differentiates through beta, stays eager.
        self._weight_step_net = config.compiled(wrap_ddp(self.net, self.device, self.dist, sync_bn=config.sync_bn,
                                                         find_unused_parameters=True))
        self.layer_names = [p.teacher_layer_names for p in pairs]
        self.trajectory = AlphaTrajectory(self.layer_names)
        self.step_count = 0

    @property
    def done(self) -> bool:
        return self.step_count >= self.total_steps

    @property
    def group(self) -> int:
        """The teacher group the next step searches."""
        return self.groups[min(self.step_count, self.total_steps - 1) // self.steps_per_group]

    def alphas(self) -> list[Tensor]:
        """alpha = softmax(beta) of every group now, float64 on the CPU."""
        return [torch.softmax(b.detach().double().cpu(), 0) for b in self.betas]

    def _batch(self, batch: Sequence[Tensor], group: int) -> Batch:
        images, labels = batch[0], batch[1]
        images = images.to(self.device, non_blocking=True, memory_format=self.memory_format)
        labels = labels.to(self.device, non_blocking=True)
        with self.autocast:
            features = teacher_features(self.teacher, images)
        return Batch(images, labels, {group: features[group]})  # the other groups' maps are freed now

    def step(self, train_batch: Sequence[Tensor], val_batch: Sequence[Tensor]) -> dict[str, Tensor]:
        """One search step: beta on ``val_batch`` (after the warm-up), the weights on ``train_batch``.

        Each batch is ``(images [B, C, H, W], labels [B])`` (extra entries are ignored), on any
        device. Returns the weight step's named losses (0-dim tensors, on the device).
        """
        if self.done:
            raise ConfigError(f"the search is done ({self.total_steps} steps); read result()")
        config, step, group = self.config, self.step_count, self.group
        for param_group in self.weight_optimizer.param_groups:  # cosine from lr to lr_min
            param_group["lr"] = config.lr_min + self._schedule(step)
        train, val = self._batch(train_batch, group), self._batch(val_batch, group)
        self.net.train()
        if step % self.steps_per_group >= self.warmup_steps:  # warm-up: the weights learn, beta waits
            self.architect.step(group, train, val, self.weight_optimizer,
                                allow=lambda grad: self.arch_guard.observe(step + 1, config.arch_lr, {
                                    "beta gradient": grad, "beta": self.betas[group]}))
        with self.autocast:
            _, losses = self._weight_step_net(train.images, train.labels, train.teacher[group],
                                              self.betas[group].detach(), group, True)
        lr = self.weight_optimizer.param_groups[0]["lr"]
        optimizer_step(sum(losses.values()), self.weight_optimizer, self.scaler, self.net.parameters(),
                       config.grad_clip, lambda norm: self.weight_guard.observe(step + 1, lr,
                                                                                {**losses, "gradient norm": norm}))
        self.step_count = step + 1
        self.trajectory.record(self.step_count, group, self.betas[group])
        return losses

    def result(self, **record: Any) -> SearchResult:
        """The aggregation found so far (every group's beta; the groups not searched keep their
        initial one and are marked so). ``record``: the result's ``teacher`` (dict), ``student``,
        ``data``, ``settings`` and ``seconds`` entries."""
        if "teacher" not in record:
            record["teacher"] = self._teacher_record()
        record.setdefault("student", network_label(network_record(self.student, 0, self.input_shape[0])))
        record.setdefault("data", "")
        record.setdefault("settings", {})
        record.setdefault("seconds", 0.0)
        return SearchResult.from_betas([b.detach().cpu() for b in self.betas], self.layer_names,
                                       [i in self.groups for i in range(len(self.pairs))], **record)

    def _teacher_record(self) -> dict:
        """The result's teacher entry for a teacher given as a module (no checkpoint file)."""
        param = next(self.teacher.parameters())
        with torch.no_grad():  # the number of classes: one probe of the frozen (eval-mode) teacher
            classes = self.teacher(torch.zeros(1, *self.input_shape, device=param.device, dtype=param.dtype)).shape[1]
        record = network_record(self.teacher, classes, self.input_shape[0])
        return {"model": network_label(record), "num_classes": classes, "in_channels": self.input_shape[0],
                "kwargs": record["kwargs"], "checkpoint": "", "sha256": ""}

    def state_dict(self) -> dict:
        """Everything a resumed search needs besides the RNG state (see ``run_search``)."""
        return {"net": self.net.state_dict(), "betas": [b.detach().cpu().clone() for b in self.betas],
                "weight_optimizer": self.weight_optimizer.state_dict(), "architect": self.architect.state_dict(),
                "scaler": self.scaler.state_dict(), "step": self.step_count, "trajectory": self.trajectory.rows,
                "nonfinite": [g.state_dict() for g in (self.arch_guard, self.weight_guard)]}

    def load_state_dict(self, state: dict) -> None:
        self.net.load_state_dict(state["net"])
        with torch.no_grad():
            for beta, saved in zip(self.betas, state["betas"], strict=True):
                beta.copy_(saved)
        self.weight_optimizer.load_state_dict(state["weight_optimizer"])
        self.architect.load_state_dict(state["architect"])
        self.scaler.load_state_dict(state["scaler"])
        self.step_count = state["step"]
        self.trajectory = AlphaTrajectory(self.layer_names, state["trajectory"])
        for guard, saved in zip((self.arch_guard, self.weight_guard), state.get("nonfinite", ({}, {}))):
            guard.load_state_dict(saved)
