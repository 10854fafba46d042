"""The formulas the known-answer tests recompute a method's losses and predictions from, written once as plain
tensor code in float64 (so that they are exact whatever precision the method ran in, and a matrix product of
theirs never runs under autocast), never through a method's own helpers or utils/losses.py (do not
import it here): a known-answer test checks the framework's code against these, so they must not share it.

    CE(z, y, [lo, hi))  = mean_i ( -z_{i,y_i} + log sum_{lo_i <= c < hi_i} exp z_{i,c} )
    KD_T(z, z_old)      = -mean_i sum_c softmax(z_old_i / T)_c log softmax(z_i / T)_c
    logsumexp(a)        = m + log sum_j exp(a_j - m),  m = max_j a_j
    unit(a)             = a / |a|                       (each row)
    cosine(a, b)        = <a_i, b_i> / (|a_i| |b_i|)     (row by row)
    close(v, e)         : |v - e| <= tol max(1, |e|)    (tol = 1e-5 unless told)
    task_bounds(y)      = [2 (y_i // 2), 2 (y_i // 2) + 2)  the classes of sample i's own task (2 classes per task)

Family-specific formulas (the bias-corrected logits of BiC, the cosine scores of UCIR and PODNet, the routing of
ACL and DynaMMo, the prompt prefixes) live beside their tests in the family's file.
"""
import pytest
import torch


def ce(z, y, lo, hi):
    """CE among the classes [lo_i, hi_i) of each sample (ints: the same range for every sample)."""
    n = len(y)
    lo = [lo] * n if isinstance(lo, int) else list(lo)
    hi = [hi] * n if isinstance(hi, int) else list(hi)
    terms = [-z[i, y[i]].double() + logsumexp(z[i, lo[i]:hi[i]]) for i in range(n)]
    return torch.stack(terms).mean()


def logsumexp(a, dim=0):
    """log sum exp a, shifted by the maximum so that large scores do not overflow."""
    a = a.double()
    m = a.max(dim, keepdim=True).values
    return (m + torch.log(torch.exp(a - m).sum(dim, keepdim=True))).squeeze(dim)


def kd(z, z_old, T):
    def log_softmax(a):
        a = a.double() / T
        return a - logsumexp(a, 1)[:, None]

    return -(log_softmax(z_old).exp() * log_softmax(z)).sum(1).mean()


def unit(a, dim=1):
    a = a.double()
    return a / a.norm(dim=dim, keepdim=True)


def cosine(a, b):
    a, b = a.double(), b.double()
    return (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1))


def close(value, expected, tol=1e-5):
    as_float = lambda v: float(v.detach()) if torch.is_tensor(v) else float(v)  # noqa: E731
    assert as_float(value) == pytest.approx(as_float(expected), rel=tol, abs=tol)


def task_bounds(y):
    """[lo, hi) of each label's own task (2 classes per task)."""
    return (y // 2 * 2).tolist(), (y // 2 * 2 + 2).tolist()
