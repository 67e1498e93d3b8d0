"""The feature losses of the baselines FitNet, AT and SP, as pure functions of one feature pair.

Each takes the student's and the teacher's feature maps of one layer pair, [B, C_s, H, W] and
[B, C_t, H, W] (same B; the same H, W where the formula needs it), and returns a 0-dim tensor
in float32 (float64 when the features are). The teacher's side is detached: no gradient reaches
the teacher. The weights (hint weight, beta, gamma) and the choice of layer pairs belong to
the caller (``dfa_ext.distill.pair_losses``); the formulas live here only.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .errors import ModelError
from .losses import at_least_float32

NORM_EPS = 1e-12  # F.normalize's default: a zero map stays zero instead of dividing by 0


def _check_pair(student: Tensor, teacher: Tensor, what: str, same: str) -> None:
    """Refuses a pair that is not two [B, C, H, W] maps agreeing on ``same``: "shape" (all four
    dimensions), "batch and size" (B, H, W), or "batch" (B; then any [B, ...] of 2+ dimensions);
    one line naming ``what``."""
    dims = {"shape": (0, 1, 2, 3), "batch and size": (0, 2, 3), "batch": (0,)}[same]
    ranks_ok = min(student.dim(), teacher.dim()) >= 2 if same == "batch" else student.dim() == teacher.dim() == 4
    if not ranks_ok or any(student.shape[d] != teacher.shape[d] for d in dims):
        layout = "[B, ...]" if same == "batch" else "[B, C, H, W]"
        raise ModelError(f"{what} needs {layout} student and teacher features of the same {same}, "
                         f"got {list(student.shape)} and {list(teacher.shape)}")


def hint_loss(student: Tensor, teacher: Tensor) -> Tensor:
    """FitNets' hint loss (Romero et al., ICLR 2015, eq. 3) as RepDistiller and mdistiller compute
    it: the mean squared error over every element,

        mean_{b, c, h, w} (r(S) - T)^2

    of the regressor's output r(S) (the caller's connector) and the teacher's hint T, both
    [B, C_t, H, W]. The paper writes (1/2) ||T - r(S)||^2 summed per sample; the mean differs by a
    constant factor that the hint weight absorbs (RepDistiller's weight 100 is on this mean)."""
    _check_pair(student, teacher, "hint_loss", "shape")
    s, t = at_least_float32(student), at_least_float32(teacher).detach()
    dtype = torch.promote_types(s.dtype, t.dtype)
    return (s.to(dtype) - t.to(dtype)).pow(2).mean()


def attention_map(features: Tensor, p: float = 2.0) -> Tensor:
    """Activation-based spatial attention (Zagoruyko & Komodakis, ICLR 2017, sec. 3.1, F^p_sum):
    the mean over channels of |f|^p, flattened and L2-normalised per sample,

        Q_b = vec(mean_c |f_bc|^p),  a_b = Q_b / max(||Q_b||_2, 1e-12):  [B, C, H, W] -> [B, H*W]

    (the paper sums over channels; the mean differs by C, which the normalisation removes)."""
    f = at_least_float32(features)
    q = f.abs().pow(p).mean(1).flatten(1)
    return F.normalize(q, p=2.0, dim=1, eps=NORM_EPS)


def attention_loss(student: Tensor, teacher: Tensor, p: float = 2.0) -> Tensor:
    """Attention transfer for one layer pair, as the AT reference code (szagoruyko/attention-transfer
    ``at_loss``), RepDistiller and mdistiller compute it:

        mean_{b, hw} (a_S - a_T)^2 = (1 / (B * H * W)) sum_b ||a_S,b - a_T,b||_2^2

    with a = :func:`attention_map` of each side. Student and teacher must share H, W (the channel
    counts may differ). The caller weights the sum over pairs by beta (the code's weighting; the
    paper's eq. 2 writes beta / 2)."""
    _check_pair(student, teacher, "attention_loss", "batch and size")
    a_s, a_t = attention_map(student, p), attention_map(teacher, p).detach()
    dtype = torch.promote_types(a_s.dtype, a_t.dtype)
    return (a_s.to(dtype) - a_t.to(dtype)).pow(2).mean()


def similarity_matrix(features: Tensor) -> Tensor:
    """Similarity-preserving KD's batch similarity (Tung & Mori, ICCV 2019, eq. 2-3): with
    F = features reshaped to [B, C*H*W], G = F F^T, each row divided by its L2 norm:

        G~_ij = G_ij / max(||G_i,:||_2, 1e-12):  [B, C, H, W] -> [B, B]"""
    f = at_least_float32(features).flatten(1)
    return F.normalize(f @ f.t(), p=2.0, dim=1, eps=NORM_EPS)


def similarity_loss(student: Tensor, teacher: Tensor) -> Tensor:
    """SP's loss for one layer pair (Tung & Mori, eq. 4, as RepDistiller's ``Similarity``, "verified
    by original author", and mdistiller compute it):

        (1 / B^2) ||G~_S - G~_T||_F^2

    with G~ = :func:`similarity_matrix` of each side ([B, B] whatever the channels and sizes: only
    the batch must match). The caller weights it by gamma."""
    _check_pair(student, teacher, "similarity_loss", "batch")
    g_s, g_t = similarity_matrix(student), similarity_matrix(teacher).detach()
    dtype = torch.promote_types(g_s.dtype, g_t.dtype)
    batch = student.shape[0]
    return (g_s.to(dtype) - g_t.to(dtype)).pow(2).sum() / batch**2
