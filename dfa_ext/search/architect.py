"""The architecture step: update beta of one group (DARTS' ``architect.py``, method.md section 5).

First order: the gradient of L_val(w, beta). Second order (DARTS "unrolled"): the gradient of
L_val(w', beta) with w' = w - xi * (the weight optimiser's next step direction), which is

    dL_val(w')/dbeta - xi * [grad_beta L_train(w + eps v) - grad_beta L_train(w - eps v)] / (2 eps)

with v = grad_w' L_val(w') and eps = 0.01 / |v| (central finite differences for the mixed
Hessian-vector product). Every evaluation runs the bare network (never a DDP wrapper, so no
gradient synchronisation hook fires) with ``torch.autograd.grad`` (the weights' ``.grad`` stay
untouched), and restores the weights and BN running statistics afterwards, bit for bit. Under
several processes the architect averages explicitly what the global batch needs: the weight
gradient that unrolls w, v, and the final beta gradient; every process then holds the same beta.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, Iterator, Mapping, Sequence

import torch
from torch import Tensor, nn

from ..training.distributed import DistContext, current_context
from .config import ARCH_BETAS, ARCH_LR, ARCH_WEIGHT_DECAY
from .network import SearchNetwork


@dataclass
class Batch:
    """One batch of the search: images [B, C, H, W], labels [B], and the teacher's features."""

    images: Tensor
    labels: Tensor
    teacher: Mapping[int, list[Tensor]] | Sequence[list[Tensor]]  # by group index: its K maps [B, C_t, h, w]


class Architect:
    """Owns beta (one vector per group) and its Adam optimisers, one per group.

    Args:
        net: the weights w (not a DDP wrapper: the architect never needs gradient hooks).
        betas: beta_i of every group, [K_i] each.
        second_order: use the unrolled gradient.
        fd_radius: the finite-difference step is eps = fd_radius / |v| (DARTS: 0.01).
        grad_clip: scale a beta gradient whose norm exceeds this down to it (None: off).
        lr, adam_betas, weight_decay: beta's Adam; the defaults are ``SearchConfig``'s (the recipe
            measured in the README), so a search assembled from the parts matches ``dfa search``.
    """

    def __init__(self, net: SearchNetwork, betas: nn.ParameterList, *, lr: float = ARCH_LR,
                 adam_betas: Sequence[float] = ARCH_BETAS, weight_decay: float = ARCH_WEIGHT_DECAY,
                 second_order: bool = False, fd_radius: float = 0.01, grad_clip: float | None = None,
                 autocast: contextlib.AbstractContextManager | None = None, dist: DistContext | None = None) -> None:
        if not fd_radius > 0:  # the finite difference divides by it
            raise ValueError(f"fd_radius must be > 0, got {fd_radius}")
        self.net, self.betas, self.second_order, self.fd_radius = net, betas, second_order, fd_radius
        self.grad_clip = grad_clip
        # One optimiser per group: Adam's weight decay must not move the groups not being searched.
        self.optimizers = [torch.optim.Adam([beta], lr=lr, betas=tuple(adam_betas), weight_decay=weight_decay)
                           for beta in betas]
        self.autocast = autocast or contextlib.nullcontext()
        self.dist = dist or current_context()

    # -- evaluation at other weights --------------------------------------------------------------

    def parameters(self) -> list[nn.Parameter]:
        return list(self.net.parameters())

    @contextlib.contextmanager
    def _weights_at(self, values: Sequence[Tensor] | None = None) -> Iterator[None]:
        """Evaluates the network at ``values`` (default: its own weights), restoring the weights
        and the BN running statistics afterwards. Values are copied in place (no module surgery,
        so networks with shared or aliased submodules behave)."""
        params = self.parameters()
        saved_params = [p.detach().clone() for p in params] if values is not None else None
        saved_buffers = [b.detach().clone() for b in self.net.buffers()]
        try:
            if values is not None:
                with torch.no_grad():
                    for p, v in zip(params, values, strict=True):
                        p.copy_(v)
            yield
        finally:
            with torch.no_grad():
                if saved_params is not None:
                    for p, v in zip(params, saved_params):
                        p.copy_(v)
                for b, v in zip(self.net.buffers(), saved_buffers):
                    b.copy_(v)

    def _loss(self, batch: Batch, group: int, beta: Tensor, *, train: bool) -> Tensor:
        """L_train (``train``: with the student's CE) or L_val of ``group`` at the current weights."""
        with self.autocast:
            _, losses = self.net(batch.images, batch.labels, batch.teacher[group], beta, group, train)
        return sum(losses.values())

    def _grad(self, loss: Tensor, inputs: Sequence[Tensor]) -> list[Tensor]:
        grads = torch.autograd.grad(loss, list(inputs), allow_unused=True)
        return [torch.zeros_like(x) if g is None else g for x, g in zip(inputs, grads)]

    # -- the beta gradient ----------------------------------------------------------------------

    def gradient(self, group: int, train: Batch, val: Batch,
                 weight_optimizer: torch.optim.SGD | None = None) -> Tensor:
        """d L_val / d beta_group (first or second order) at the current weights, [K].

        Leaves the weights, their gradients and the BN statistics as they were.
        """
        beta = self.betas[group]
        params = self.parameters()
        if not self.second_order:
            with self._weights_at():
                return self._grad(self._loss(val, group, beta, train=False), [beta])[0]
        if weight_optimizer is None:
            raise ValueError("the second-order step needs the weight optimizer (its lr, momentum and decay)")
        xi = weight_optimizer.param_groups[0]["lr"]
        w = [p.detach().clone() for p in params]
        with self._weights_at():
            g_train = self._grad(self._loss(train, group, beta.detach(), train=True), params)
        self.dist.average_(g_train)  # the global batch's gradient: every process unrolls to the same w'
        unrolled = [p - xi * d for p, d in zip(w, sgd_step_direction(weight_optimizer, params, g_train))]
        with self._weights_at(unrolled):
            grads = self._grad(self._loss(val, group, beta, train=False), [beta, *params])
        d_beta, v = grads[0], grads[1:]
        self.dist.average_(v)  # the same v (and eps) everywhere; d_beta is averaged in step()
        norm = torch.sqrt(sum((x.double() ** 2).sum() for x in v)).item()
        if norm == 0:  # the validation loss does not depend on w (e.g. gamma_st = 0): no unrolled term
            return d_beta
        eps = self.fd_radius / norm
        shifted = []
        for sign in (1.0, -1.0):
            with self._weights_at([p + sign * eps * vi for p, vi in zip(w, v)]):
                shifted.append(self._grad(self._loss(train, group, beta, train=True), [beta])[0])
        hessian_vector = (shifted[0] - shifted[1]) / (2 * eps)
        # dw'/dbeta = -xi * (d direction / d gradient) * d2L_train/dw dbeta; the first factor is 1
        # for plain momentum SGD and 1 + mu with Nesterov (the gradient enters its step twice).
        group_settings = weight_optimizer.param_groups[0]
        slope = 1.0 + group_settings["momentum"] if group_settings["nesterov"] else 1.0
        return d_beta - xi * slope * hessian_vector

    def step(self, group: int, train: Batch, val: Batch, weight_optimizer: torch.optim.SGD | None = None,
             allow: Callable[[Tensor], bool] | None = None) -> Tensor:
        """One Adam step of beta_group; returns the (process-averaged, clipped) gradient used.

        ``allow`` (the divergence guard) sees that gradient first; when it says no, beta and
        Adam's state stay as they were.
        """
        grad = self.gradient(group, train, val, weight_optimizer)
        if self.dist.active:
            grad = (self.dist.all_reduce_sum(grad) / self.dist.world_size).to(grad)
        if self.grad_clip is not None:  # on the device: no host sync
            grad = grad * (self.grad_clip / grad.norm().clamp_min(self.grad_clip))
        if allow is not None and not allow(grad):
            return grad
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
