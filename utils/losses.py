"""Every loss of the project, each with its formula: the only place methods and network parts take them from.

Notation: z are logits (B, C), y integer targets (B,), T a temperature, softmax and log_softmax over classes,
cos the cosine similarity. Losses are computed in at least float32 (bfloat16 activations under mixed precision
are widened by `upcast`, and a loss with a matrix product runs with autocast off, `full_precision`; a float64
run stays in float64); tests/test_precision.py checks each under bfloat16 autocast.
"""
from __future__ import annotations

import torch
from torch.nn import functional as F

from utils.precision import full_precision, upcast


# ---- classification ----
def restrict_logits(logits: torch.Tensor, y: torch.Tensor, lo, hi) -> tuple[torch.Tensor, torch.Tensor]:
    """The logits and targets of a classification among the classes [lo, hi) only.

    `lo`, `hi` ints: the same classes for every sample, so the logits are sliced to z[:, lo:hi] and the targets
    shifted to y - lo (every y must lie in the range). (B,) tensors: each sample i its own range [lo_i, hi_i),
    so the other classes' logits are set to -inf and the targets stay as they are."""
    if isinstance(lo, int) and isinstance(hi, int):
        return upcast(logits[:, lo:hi]), y - lo
    cols = torch.arange(logits.shape[1], device=logits.device)
    outside = (cols < lo[:, None]) | (cols >= hi[:, None])
    return upcast(logits).masked_fill(outside, float("-inf")), y


def bounded_ce(logits: torch.Tensor, y: torch.Tensor, lo, hi) -> torch.Tensor:
    """Cross-entropy among the classes [lo, hi) (see `restrict_logits`), the one class-range CE of every method:

        loss = mean_i ( -z_{i,y_i} + log sum_{lo_i <= c < hi_i} exp(z_{i,c}) )

    cil: lo = 0, hi = seen classes; til: [lo_i, hi_i) the classes of y_i's task; prompt methods: the current
    task's classes."""
    return F.cross_entropy(*restrict_logits(logits, y, lo, hi))


def class_task_bounds(tasks) -> torch.Tensor:
    """(C, 2) long tensor: row c holds [known, total) of the task that adds class c (per-sample bounds)."""
    return torch.as_tensor([[t.known, t.total] for t in tasks for _ in range(t.total - t.known)], dtype=torch.long)


def others_cross_entropy(logits: torch.Tensor, y: torch.Tensor, known: int, total: int) -> torch.Tensor:
    """Cross-entropy of a head over the classes [known, total) plus a last "others" output (DER's auxiliary head,
    ACL's task heads):

        target_i = y_i - known   if known <= y_i < total,   else  n = total - known ("others")
        loss = mean_i CE(z_i, target_i)          z: (B, n + 1) logits"""
    inside = (y >= known) & (y < total)
    return F.cross_entropy(upcast(logits), torch.where(inside, y - known, torch.full_like(y, total - known)))


def nca_loss(logits: torch.Tensor, y: torch.Tensor, margin: float) -> torch.Tensor:
    """PODNet's NCA loss with the margin on the positive only, hinged at 0 and averaged over the batch:
    [ log Σ_{c≠y} exp(z_c) − (z_y − δ) ]₊ for scaled scores z = η ŷ (B, C) and margin δ. Logits set to -inf
    (classes outside a sample's range) drop out of the sum."""
    positive = F.one_hot(y, logits.shape[1]).bool()
    negatives = upcast(logits).masked_fill(positive, float("-inf")).logsumexp(dim=1)
    return F.relu(negatives - upcast(logits)[positive] + margin).mean()


def margin_ranking_loss(cosine: torch.Tensor, y: torch.Tensor, n_old: int, k: int, margin: float) -> torch.Tensor:
    """LUCIR's inter-class separation on σ-free scores: for every old-class sample (y < n_old),
    max(0, m − cos_y + cos_k) for each of its K highest new-class cosines cos_k; the mean over those
    (sample, k) pairs, 0 when the batch holds no old-class sample."""
    hard = cosine[:, n_old:].topk(min(k, cosine.shape[1] - n_old), dim=1).values
    terms = F.relu(margin - cosine.gather(1, y[:, None]) + hard)[y < n_old]
    return terms.sum() / max(terms.numel(), 1)


# ---- distillation ----
def kd_loss(logits: torch.Tensor, old_logits: torch.Tensor, T: float) -> torch.Tensor:
    """Knowledge distillation (Hinton et al. 2015, as used by iCaRL/WA/BiC in the original code):

        KD(z, z_old) = -(1/B) sum_i sum_c softmax(z_old_i / T)_c * log_softmax(z_i / T)_c

    `logits` are the current network's outputs on the old classes (B, C_old), `old_logits` the frozen previous
    network's (B, C_old). No T^2 factor (the original's scale; the weighting is left to the caller)."""
    targets = F.softmax(upcast(old_logits) / T, dim=1)
    return -(targets * F.log_softmax(upcast(logits) / T, dim=1)).sum(1).mean()


def weighted_kd_losses(ce: torch.Tensor, logits: torch.Tensor, old_logits: torch.Tensor | None,
                       T: float) -> dict[str, torch.Tensor]:
    """CE and KD weighted by the share of old classes (WA, BiC), with C_old = old_logits.shape[1] and C_seen =
    logits.shape[1] (`logits` restricted to the seen classes):

        lam = C_old / C_seen;   {"ce": (1 - lam) * ce, "kd": lam * KD_T(z[:, :C_old], z_old)}

    Just {"ce": ce} before there is an old network (`old_logits` None)."""
    if old_logits is None:
        return {"ce": ce}
    lam = old_logits.shape[1] / logits.shape[1]
    return {"ce": (1 - lam) * ce, "kd": lam * kd_loss(logits[:, : old_logits.shape[1]], old_logits, T)}


def feature_distillation(features: torch.Tensor, old_features: torch.Tensor) -> torch.Tensor:
    """LUCIR's less-forget loss and PODNet's POD-flat, as the original computes both: mean over the batch of
    1 − cos(f(x), f_old(x))."""
    return (1 - F.cosine_similarity(upcast(features), upcast(old_features), dim=1)).mean()


def pod_spatial(maps: list[torch.Tensor], old_maps: list[torch.Tensor]) -> torch.Tensor:
    """POD-spatial on squared activations with L2-normalised descriptors (as the original computes it): for each
    layer, Φ(h) = normalise([Σ_H h², Σ_W h²]) over channels x width and channels x height, loss
    ‖Φ(h) − Φ(h_old)‖₂, averaged over the batch and then over the layers."""
    losses = []
    for new, old in zip(maps, old_maps, strict=True):
        descriptors = [F.normalize(torch.cat([a.sum(2).flatten(1), a.sum(3).flatten(1)], 1), dim=1)
                       for a in (upcast(new).pow(2), upcast(old).pow(2))]
        losses.append(torch.linalg.vector_norm(descriptors[0] - descriptors[1], dim=1).mean())
    return torch.stack(losses).mean()


# ---- prompts ----
def key_matching_loss(cos: torch.Tensor) -> torch.Tensor:
    """L2P's surrogate loss pulling the selected keys to the query: mean over the batch of sum_k (1 - cos_k)."""
    return (1 - cos).sum(dim=1).mean()


@full_precision
def orthogonality_penalty(m: torch.Tensor) -> torch.Tensor:
    """mean((M M^T - I)^2) for each (rows, F) matrix M of a (..., rows, F) batch: zero iff M's rows are
    orthonormal (CODA-Prompt)."""
    eye = torch.eye(m.shape[-2], device=m.device, dtype=m.dtype)
    return (m @ m.mT - eye).square().mean(dim=(-2, -1))


# ---- self-supervised pretraining ----
@full_precision
def info_nce(q: torch.Tensor, k: torch.Tensor, negatives: torch.Tensor, T: float) -> torch.Tensor:
    """MoCo's InfoNCE (van den Oord et al. 2018; He et al. 2020, eq. 1) for L2-normalised queries q (B, D), their
    positive keys k (B, D) and negative keys n_j (the queue, (K, D)), all compared by dot product:

        loss = mean_i −log( exp(q_i·k_i / T) / (exp(q_i·k_i / T) + Σ_j exp(q_i·n_j / T)) )

    i.e. cross-entropy with the positive as class 0 among 1 + K logits. k and the negatives get no gradient."""
    q, k, negatives = upcast(q), upcast(k).detach(), upcast(negatives).detach()
    logits = torch.cat([(q * k).sum(1, keepdim=True), q @ negatives.T], 1) / T
    return F.cross_entropy(logits, torch.zeros(len(q), dtype=torch.long, device=q.device))


def simsiam_loss(p1: torch.Tensor, p2: torch.Tensor, z1: torch.Tensor, z2: torch.Tensor) -> torch.Tensor:
    """SimSiam's symmetrised negative cosine similarity with stop-gradient (Chen & He 2021, eq. 1-2): for the
    predictions p and projections z of two views,

        loss = ½ D(p1, sg(z2)) + ½ D(p2, sg(z1)),   D(p, z) = −mean_i cos(p_i, z_i)

    where sg stops the gradient (z is treated as a constant). Its minimum is −1."""
    def d(p, z):
        return -F.cosine_similarity(upcast(p), upcast(z).detach(), dim=1).mean()

    return 0.5 * d(p1, z2) + 0.5 * d(p2, z1)


@full_precision
def weighted_squared_distance(theta: torch.Tensor, anchor: torch.Tensor, fisher: torch.Tensor) -> torch.Tensor:
    """EWC's penalty of one parameter tensor: sum_i F_i (theta_i - theta*_i)^2, in at least float32."""
    return (fisher * (theta - anchor).square()).sum()
