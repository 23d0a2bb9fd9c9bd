"""Losses and random views shared by the self-supervised backbones, written once.

- :func:`cosine_alignment`: ``1 - mean cos(online, target)`` with the target detached
  (BM3's bootstrap loss).
- :func:`info_nce_candidates`: the sum-reduced InfoNCE of LGMRec's hypergraph contrast, every
  row of a candidate table a negative (:func:`clearrec.models.graph.info_nce` is the in-batch
  form of MGCN / SMORE).
- :func:`dropout` / :func:`gumbel_softmax`: inverted dropout and the Gumbel-softmax drawn
  from an optional ``torch.Generator`` (the trainer's seeded one, handed to ``pre_epoch``),
  so a seeded run repeats exactly whatever else used the global RNG.

BPR, the batch embedding regulariser and the feature-mapping check are
:func:`clearrec.models.graph.bpr_loss`, :func:`clearrec.models.graph.emb_norm` and
:func:`clearrec.models.graph.check_features`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def cosine_alignment(online: Tensor, target: Tensor) -> Tensor:
    """``1 - mean_b cos(online_b, target_b)`` over (B, d) rows; no gradient reaches ``target``."""
    return 1.0 - F.cosine_similarity(online, target.detach(), dim=-1).mean()


def info_nce_candidates(anchor: Tensor, positive: Tensor, candidates: Tensor, tau: float, counts: Tensor | None = None) -> Tensor:
    r"""``-sum_b n_b log( exp(c(a_b, p_b) / tau) / sum_j exp(c(a_b, x_j) / tau) )`` with ``c`` the cosine.

    ``anchor``, ``positive``: (B, d); ``candidates``: (N, d), the positives among them (LGMRec's
    ``ssl_triple_loss``: summed over the batch, not averaged). ``counts`` (B,) weighs each row
    ``n_b`` (default 1): a batch's distinct rows with their multiplicities give the loss of the
    whole batch. Cosines are at most 1, so for ``tau > 1/80`` the exponentials cannot overflow
    and are summed directly (in place on the (B, N) logits); below that, ``logsumexp``.
    """
    a = F.normalize(anchor) / tau  # (B, d), 1 / tau folded in before the (B, N) product
    p, x = F.normalize(positive), F.normalize(candidates)
    pos = (a * p).sum(1)  # (B,)
    logits = a @ x.T  # (B, N)
    total = logits.exp_().sum(1).log() if tau > 1 / 80 else torch.logsumexp(logits, dim=1)
    per_row = total - pos
    return per_row.sum() if counts is None else (per_row * counts).sum()


def dropout(x: Tensor, p: float, generator: torch.Generator | None = None) -> Tensor:
    """Inverted dropout: each entry zeroed with probability ``p``, the rest scaled by ``1 / (1 - p)``."""
    if p <= 0:
        return x
    if p >= 1:
        return torch.zeros_like(x)
    mask = torch.empty(x.shape, device=x.device, dtype=x.dtype).bernoulli_(1.0 - p, generator=generator)
    return x * mask.div_(1.0 - p)


def gumbel_softmax(logits: Tensor, tau: float, generator: torch.Generator | None = None) -> Tensor:
    """``softmax((logits + g) / tau)`` over the last dim, ``g ~ Gumbel(0, 1)`` (as ``F.gumbel_softmax``, soft)."""
    gumbels = -torch.empty(logits.shape, device=logits.device, dtype=logits.dtype).exponential_(generator=generator).log()
    return torch.softmax((logits + gumbels) / tau, dim=-1)
