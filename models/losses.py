"""Losses and random views shared by the self-supervised backbones, written once.

- :func:`cosine_alignment`: ``1 - mean cos(online, target)`` with the target detached
  (BM3's bootstrap loss).
- :func:`info_nce_candidates`: the sum-reduced InfoNCE of LGMRec's hypergraph contrast, every
  row of a candidate table a negative (:func:`clearrec.models.graph.info_nce` is the in-batch
  form of MGCN / SMORE).
- :func:`row_logsumexp`: ``log sum_j exp(a_i . x_j + s_j)`` per row, the denominator of both,
  with a hand-written backward over one saved (n, m) table of exponentials; :class:`TableCache`
  keeps such tables from batch to batch.
- :func:`bpr_emb_loss`: BPR of dot-product scores plus the batch embedding regulariser
  (VBPR, BPR-MF, LGMRec), one autograd node with a hand-written backward.
- :func:`dropout` / :func:`gumbel_softmax`: inverted dropout and the Gumbel-softmax drawn
  from an optional ``torch.Generator`` (the trainer's seeded one, handed to ``pre_epoch``),
  so a seeded run repeats exactly whatever else used the global RNG.

BPR, the batch embedding regulariser and the feature-mapping check are
:func:`clearrec.models.graph.bpr_loss`, :func:`clearrec.models.graph.emb_norm` and
:func:`clearrec.models.graph.check_features`.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable


class _CosineAlignment(torch.autograd.Function):
    """``1 - mean_b cos(a_b, t_b)`` with ``cos = a . t / (max(|a|, eps) max(|t|, eps))`` (the value of
    ``F.cosine_similarity``), in three reductions forward and one fused pass backward:
    ``d/da_b = -(t_b / (|a_b| |t_b|) - cos_b a_b / |a_b|^2) / B``, the second term only where
    ``|a_b|`` is not clamped to ``eps``. ``t`` gets no gradient."""

    @staticmethod
    def forward(ctx, a: Tensor, t: Tensor, eps: float) -> Tensor:  # type: ignore[override]
        norm_a = torch.linalg.vector_norm(a, dim=1).clamp_min_(eps)  # (B,)
        norms = torch.linalg.vector_norm(t, dim=1).clamp_min_(eps).mul_(norm_a)  # |a| |t|
        cos = torch.linalg.vecdot(a, t).div_(norms)  # (B,)
        ctx.eps = eps
        ctx.save_for_backward(a, t, norm_a, norms, cos)
        return 1.0 - cos.mean()

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None, None]:  # type: ignore[override]
        a, t, norm_a, norms, cos = ctx.saved_tensors
        w = cos.div(norm_a).where(norm_a > ctx.eps, 0).div_(norm_a)  # cos / |a|^2, 0 where clamped
        d_a = torch.addcmul(t / norms.unsqueeze(1), a, w.unsqueeze(1), value=-1)
        return d_a.mul_(grad / -a.shape[0]), None, None


def cosine_alignment(online: Tensor, target: Tensor, eps: float = 1e-8) -> Tensor:
    """``1 - mean_b cos(online_b, target_b)`` over (B, d) rows (``F.cosine_similarity``'s cosine); no
    gradient reaches ``target``. One autograd node with a hand-written backward."""
    return _CosineAlignment.apply(online, target.detach(), eps)


class _RowLogSumExp(torch.autograd.Function):
    """``log sum_j exp(a_i . x_j + s_j)``: the (n, m) logits are exponentiated in place (first shifted
    by their row maxima unless ``bounded``), and only those exponentials ``E`` are kept for the
    backward pass, whose gradient with respect to the logits is the row softmax ``E / rowsum(E)``
    times the incoming one. That gradient table is never made: with ``w = grad / rowsum(E)`` (n,),
    ``d/da = w * (E x)``, ``d/dx = E^T (w * a)`` and ``d/ds = E^T w``, each one pass over ``E``."""

    @staticmethod
    def forward(ctx, a: Tensor, x: Tensor, shift: Tensor | None, bounded: bool, out: Tensor | None) -> Tensor:  # type: ignore[override]
        logits = a @ x.T if out is None else torch.mm(a, x.T, out=out)  # (n, m)
        if shift is not None:
            logits.add_(shift)
        row_top = None if bounded else logits.amax(1, keepdim=True)  # (n, 1)
        exps = (logits if bounded else logits.sub_(row_top)).exp_()
        total = exps.sum(1)  # (n,)
        ctx.save_for_backward(a, x, exps, total)
        return total.log() if bounded else total.log() + row_top.squeeze(1)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, Tensor | None, Tensor | None, None, None]:  # type: ignore[override]
        a, x, exps, total = ctx.saved_tensors
        w = grad / total  # (n,): d out_i / d logit_ij = w_i * exps_ij
        # (x^T E^T)^T and ((w a)^T E)^T: the same products as E x and E^T (w a), which MKL ran 3-5x
        # slower on the benchmark machine when x and a are narrow (LGMRec's h = 4 columns)
        return ((x.T @ exps.T).T.mul_(w[:, None]) if ctx.needs_input_grad[0] else None,
                ((a * w[:, None]).T @ exps).T if ctx.needs_input_grad[1] else None,
                w @ exps if ctx.needs_input_grad[2] else None, None, None)


def row_logsumexp(a: Tensor, x: Tensor, shift: Tensor | None = None, bound: float | None = None,
                  out: Tensor | None = None) -> Tensor:
    """(n,) ``log sum_j exp(a_i . x_j + shift_j)`` of ``a`` (n, d) against ``x`` (m, d), ``shift`` (m,) or none.

    Equals ``torch.logsumexp(a @ x.T + shift, dim=1)``, with one (n, m) table made and kept instead of
    autograd's several. ``bound``: a known bound of every ``|a_i . x_j|`` (``1 / tau`` for unit rows
    scaled by ``1 / tau``). When ``bound + max |shift| + log m`` is below 80, no exponential (nor a row's
    sum of them) can overflow or underflow in float32, and the logits are exponentiated as they are;
    otherwise each row is first shifted by its maximum (one more pass over the table). ``out``: an
    (n, m) table to hold the exponentials (a :class:`TableCache`'s), kept for the backward pass.
    """
    reach = float("inf") if bound is None else float(bound) + math.log(max(len(x), 1))
    if shift is not None and len(shift):
        reach += float(shift.abs().max())
    return _RowLogSumExp.apply(a, x, shift, reach < 80, out)


class TableCache:
    """(n, m) tables kept from batch to batch for :func:`row_logsumexp`'s ``out``, one per key.

    A new table of a batch's (distinct users x all users) logits, 150 MB on Amazon Baby, costs more
    in page faults (and, with transparent huge pages, in compaction) than the product that fills
    it. A table saved for a backward pass that has not run yet and then written again makes
    autograd raise (its version changed) instead of using the wrong values.
    """

    def __init__(self) -> None:
        self._flat: dict[Any, Tensor] = {}

    def table(self, key: Any, n: int, m: int, like: Tensor) -> Tensor:
        """An (n, m) table of ``like``'s dtype and device; its storage grows by a quarter when too small."""
        flat = self._flat.get(key)
        if flat is None or flat.numel() < n * m or (flat.device, flat.dtype) != (like.device, like.dtype):
            flat = self._flat[key] = like.new_empty(n * m * 5 // 4 + 1)
        return flat[: n * m].view(n, m)

    def clear(self) -> None:
        self._flat.clear()


class _BprEmbNorm(torch.autograd.Function):
    """``mean_b softplus(u_b . (n_b - p_b)) + reg * (||u|| + ||p|| + ||n||) / B``, its gradient written out:
    with ``s_b = sigmoid(u_b . (n_b - p_b)) / B``, ``d/du = s (n - p) + reg u / (B ||u||)``,
    ``d/dp = -s u + reg p / (B ||p||)``, ``d/dn = s u + reg n / (B ||n||)`` (a zero norm's term is 0)."""

    @staticmethod
    def forward(ctx, u: Tensor, p: Tensor, n: Tensor, reg: float) -> Tensor:  # type: ignore[override]
        diff = n - p  # (B, d)
        x = (u * diff).sum(1)  # (B,): score of the negative minus that of the positive
        norms = torch.stack([u.norm(), p.norm(), n.norm()]) if reg else None
        ctx.reg = reg
        ctx.save_for_backward(u, p, n, diff, x, norms)
        loss = F.softplus(x).mean()
        return loss + reg * norms.sum() / len(u) if reg else loss

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: Tensor) -> tuple[Tensor, Tensor, Tensor, None]:  # type: ignore[override]
        u, p, n, diff, x, norms = ctx.saved_tensors
        b = len(u)
        s = (torch.sigmoid(x) * (grad / b))[:, None]  # (B, 1)
        su = s * u
        if not ctx.reg:
            return s * diff, -su, su, None
        r = torch.where(norms > 0, (grad * ctx.reg / b) / norms, torch.zeros_like(norms))  # (3,)
        return torch.addcmul(u * r[0], s, diff), (p * r[1]).sub_(su), (n * r[2]).add_(su), None


def bpr_emb_loss(u: Tensor, p: Tensor, n: Tensor, reg: float = 0.0) -> Tensor:
    """``bpr_loss((u * p).sum(1), (u * n).sum(1)) + reg * emb_norm(u, p, n)`` of (B, d) rows, as one node.

    The value and gradients of the composition in :mod:`clearrec.models.graph` (tested), with about
    half its work: autograd keeps and revisits each product, sum and norm separately.
    """
    return _BprEmbNorm.apply(u, p, n, float(reg))


def info_nce_candidates(anchor: Tensor, positive: Tensor, candidates: Tensor, tau: float, counts: Tensor | None = None,
                        factors: tuple[Tensor, Tensor, Tensor, Tensor] | None = None, out: Tensor | None = None) -> Tensor:
    r"""``-sum_b n_b log( exp(c(a_b, p_b) / tau) / sum_j exp(c(a_b, x_j) / tau) )`` with ``c`` the cosine.

    ``anchor``, ``positive``: (B, d); ``candidates``: (N, d), the positives among them (LGMRec's
    ``ssl_triple_loss``: summed over the batch, not averaged). ``counts`` (B,) weighs each row
    ``n_b`` (default 1): a batch's distinct rows with their multiplicities give the loss of the
    whole batch. The denominator is :func:`row_logsumexp` (stable for any ``tau``).

    ``factors``: ``(P, Z, Q, Y)`` with ``anchor = P Z`` (P (B, h), Z (h, d)) and ``candidates = Q Y``
    (Q (N, h), Y (h, d)), as LGMRec's hypergraph embeddings are (``h`` hyperedges). The (B, N)
    cosines are then ``(P Z Y^T / |a_b|) (Q / |x_j|)^T``, a product over ``h`` instead of ``d``
    (the same value up to rounding). ``out``: :func:`row_logsumexp`'s (B, N) table.
    """
    a = F.normalize(anchor) / tau  # (B, d), 1 / tau folded in before the (B, N) product
    p = F.normalize(positive)
    if factors is None:
        lse = row_logsumexp(a, F.normalize(candidates), bound=1 / tau, out=out)
    else:
        pa, za, qx, yx = factors
        eps = 1e-12  # F.normalize's
        a_low = (pa @ (za @ yx.T)) / (anchor.norm(dim=1, keepdim=True).clamp_min(eps) * tau)  # (B, h)
        x_low = qx / candidates.norm(dim=1, keepdim=True).clamp_min(eps)  # (N, h)
        lse = row_logsumexp(a_low, x_low, bound=1 / tau, out=out)
    per_row = lse - (a * p).sum(1)
    return per_row.sum() if counts is None else (per_row * counts).sum()


def dropout(x: Tensor, p: float, generator: torch.Generator | None = None) -> Tensor:
    """Inverted dropout: each entry zeroed with probability ``p``, the rest scaled by ``1 / (1 - p)``.

    The mask is one vectorised uniform draw compared with ``1 - p`` (``bernoulli_`` draws entry by
    entry, about 3x slower on CPU)."""
    if p <= 0:
        return x
    if p >= 1:
        return torch.zeros_like(x)
    keep = torch.rand(x.shape, generator=generator, device=x.device, dtype=x.dtype).lt_(1.0 - p)  # 1 w.p. 1 - p, else 0
    return x * keep.div_(1.0 - p)


def gumbel_softmax(logits: Tensor, tau: float, generator: torch.Generator | None = None) -> Tensor:
    """``softmax((logits + g) / tau)`` over the last dim, ``g ~ Gumbel(0, 1)`` (as ``F.gumbel_softmax``, soft)."""
    gumbels = -torch.empty(logits.shape, device=logits.device, dtype=logits.dtype).exponential_(generator=generator).log()
    return torch.softmax((logits + gumbels) / tau, dim=-1)
