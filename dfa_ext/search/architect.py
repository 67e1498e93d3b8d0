"""The architecture step: update beta of one group (DARTS' ``architect.py``, method.md section 5).

First order: the gradient of L_val(w, beta). Second order (DARTS "unrolled"): the gradient of
L_val(w', beta) with w' = w - xi * (the weight optimiser's next step direction), which is

    dL_val(w')/dbeta - xi * [grad_beta L_train(w + eps v) - grad_beta L_train(w - eps v)] / (2 eps)

with v = grad_w' L_val(w') and eps = 0.01 / |v| (central finite differences for the mixed
Hessian-vector product). Every evaluation here is functional (``torch.func.functional_call``
on detached copies of the weights and BN buffers): the model's weights, BN running statistics
and gradients are left exactly as they were, and no DistributedDataParallel hook runs, so under
several processes only the beta gradient itself is averaged.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor, nn
from torch.func import functional_call

from ..training.distributed import DistContext, current_context
from .network import SearchNetwork


@dataclass
class Batch:
    """One batch of the search: images [B, C, H, W], labels [B], and the teacher's features."""

    images: Tensor
    labels: Tensor
    teacher: list[list[Tensor]]  # per group, K maps [B, C_t, h, w]


class Architect:
    """Owns beta (one vector per group) and its Adam optimisers, one per group.

    Args:
        net: the weights w (not a DDP wrapper: the architect never needs gradient hooks).
        betas: beta_i of every group, [K_i] each.
        second_order: use the unrolled gradient.
    """

    def __init__(self, net: SearchNetwork, betas: nn.ParameterList, *, lr: float = 3e-4,
                 adam_betas: Sequence[float] = (0.5, 0.999), weight_decay: float = 1e-3,
                 second_order: bool = False, autocast: contextlib.AbstractContextManager | None = None,
                 dist: DistContext | None = None) -> None:
        self.net, self.betas, self.second_order = net, betas, second_order
        # One optimiser per group: Adam's weight decay must not move the groups not being searched.
        self.optimizers = [torch.optim.Adam([beta], lr=lr, betas=tuple(adam_betas), weight_decay=weight_decay)
                           for beta in betas]
        self.autocast = autocast or contextlib.nullcontext()
        self.dist = dist or current_context()

    # -- evaluation at arbitrary weights --------------------------------------------------------

    def weights(self) -> dict[str, Tensor]:
        return dict(self.net.named_parameters())

    def _loss(self, weights: dict[str, Tensor], batch: Batch, group: int, beta: Tensor, *,
              train: bool) -> Tensor:
        """L_train (``train``: with the student's CE) or L_val of ``group`` at ``weights``."""
        buffers = {name: b.detach().clone() for name, b in self.net.named_buffers()}  # BN stats untouched
        with self.autocast:
            _, losses = functional_call(self.net, {**weights, **buffers},
                                        (batch.images, batch.labels, batch.teacher[group], beta, group, train))
        return sum(losses.values())

    def _grad(self, loss: Tensor, inputs: Sequence[Tensor]) -> list[Tensor]:
        grads = torch.autograd.grad(loss, list(inputs), allow_unused=True)
        return [torch.zeros_like(x) if g is None else g for x, g in zip(inputs, grads)]

    # -- the beta gradient ----------------------------------------------------------------------

    def gradient(self, group: int, train: Batch, val: Batch,
                 weight_optimizer: torch.optim.SGD | None = None) -> Tensor:
        """d L_val / d beta_group (first or second order) at the current weights, [K]."""
        beta = self.betas[group]
        weights = self.weights()
        if not self.second_order:
            return self._grad(self._loss(weights, val, group, beta, train=False), [beta])[0]
        if weight_optimizer is None:
            raise ValueError("the second-order step needs the weight optimizer (its lr, momentum and decay)")
        xi = weight_optimizer.param_groups[0]["lr"]
        names = list(weights)
        params = [weights[n].detach() for n in names]
        g_train = self._grad(self._loss(weights, train, group, beta.detach(), train=True),
                             [weights[n] for n in names])
        steps = sgd_step_direction(weight_optimizer, [weights[n] for n in names], g_train)
        unrolled = [(p - xi * d).requires_grad_() for p, d in zip(params, steps)]
        loss_val = self._loss(dict(zip(names, unrolled)), val, group, beta, train=False)
        grads = self._grad(loss_val, [beta, *unrolled])
        d_beta, v = grads[0], grads[1:]
        eps = 0.01 / torch.sqrt(sum((x.double() ** 2).sum() for x in v)).item()
        shifted = []
        for sign in (1.0, -1.0):
            at = {n: p + sign * eps * vi for n, p, vi in zip(names, params, v)}
            shifted.append(self._grad(self._loss(at, train, group, beta, train=True), [beta])[0])
        hessian_vector = (shifted[0] - shifted[1]) / (2 * eps)
        return d_beta - xi * hessian_vector

    def step(self, group: int, train: Batch, val: Batch, weight_optimizer: torch.optim.SGD | None = None) -> Tensor:
        """One Adam step of beta_group; returns the (process-averaged) gradient used."""
        grad = self.gradient(group, train, val, weight_optimizer)
        if self.dist.active:
            grad = (self.dist.all_reduce_sum(grad) / self.dist.world_size).to(grad)
        beta = self.betas[group]
        beta.grad = grad.to(beta.dtype)
        self.optimizers[group].step()
        beta.grad = None
        return grad

    def state_dict(self) -> dict:
        return {"optimizers": [o.state_dict() for o in self.optimizers]}

    def load_state_dict(self, state: dict) -> None:
        for optimizer, saved in zip(self.optimizers, state["optimizers"], strict=True):
            optimizer.load_state_dict(saved)


def sgd_step_direction(optimizer: torch.optim.SGD, params: Sequence[Tensor], grads: Sequence[Tensor]) -> list[Tensor]:
    """The direction d of the optimiser's next step p <- p - lr * d for gradients ``grads``.

    SGD with weight decay wd, momentum mu (buffer b, absent before the first step) and
    optionally Nesterov: g' = g + wd p; b' = mu b + g' (g' on the first step); d = b', or
    g' + mu b' with Nesterov. This is DARTS' "virtual step" including momentum and decay.
    """
    group = optimizer.param_groups[0]
    wd, mu, nesterov = group["weight_decay"], group["momentum"], group["nesterov"]
    directions = []
    for p, g in zip(params, grads):
        g = g.detach() + wd * p.detach()
        if mu:
            buffer = optimizer.state.get(p, {}).get("momentum_buffer")
            b = g if buffer is None else mu * buffer + g
            g = g + mu * b if nesterov else b
        directions.append(g)
    return directions
