"""Known-answer tests: every loss a method's step returns, and what it predicts, recomputed here from the paper's
formula on a tiny fixed setup (fixed weights, a fixed batch, a fixed teacher), never through the method's own
helpers or utils/losses.py. The network's forward pass (backbone, linear layer) is used as it is; everything on
top of it (class ranges, slices, weights, temperatures, normalisations, signs) is written out below.

The formulas, written once as plain tensor code:
    CE(z, y, [lo, hi))  = mean_i ( -z_{i,y_i} + log sum_{lo_i <= c < hi_i} exp z_{i,c} )
    KD_T(z, z_old)      = -mean_i sum_c softmax(z_old_i / T)_c log softmax(z_i / T)_c
"""
import math
import os

import numpy as np
import pytest
import torch
from torch import nn

from conftest import ROOT, known_answer
from datasets.scenario import DataManager
from methods import METHODS, build_method, method_config
from trainer.cli import parse_overrides as parse_cli_overrides
from trainer.config_loader import load_config
from utils.registry import UserError
from trainer.engine.engine import Engine
from utils.types import Action, OptimConfig, Stage

# digits at the native 8 px, 2 classes per task, the identity class order: class c belongs to task c // 2
BASE = ["--device", "cpu", "--seed", "1", "--init_cls", "2", "--increment", "2", "--img_size", "8",
        "--shuffle", "false"]
VIT = ["--img_size", "16"]


def build(method, *overrides):
    torch.manual_seed(0)
    cfg = load_config(os.path.join(ROOT, "options", method, "digits.yaml"), parse_cli_overrides([*BASE, *overrides]),
                      method_config)
    single = METHODS.meta(method)["method_type"] in ("single_step", "pretrain")
    return build_method(cfg, DataManager(cfg, seed=1, single_task=single))


def start(method, index):
    method.begin_task(method.data.tasks[index])
    return method.task


def perturb(module, seed, scale=0.3):
    """Move every trainable float parameter by seeded noise (so student and teacher, old and new rows differ)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            if p.is_floating_point():
                p.add_(scale * torch.randn(p.shape, generator=g))


def samples(method, classes, per_class=3):
    """The first `per_class` train samples of each class, as a batch (x, y)."""
    data = method.data
    idx = np.concatenate([data.indices("train", [c])[:per_class] for c in classes])
    items = [data.dataset("train", idx, augment=False)[i] for i in range(len(idx))]
    return torch.stack([x for x, _ in items]), torch.as_tensor([y for _, y in items])


def positions(method, classes, per_class=3):
    return np.concatenate([method.data.indices("train", [c])[:per_class] for c in classes])


# ---- the formulas ----
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
    return a / a.norm(dim=dim, keepdim=True)


def cosine(a, b):
    return (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1))


def close(value, expected, tol=1e-5):
    as_float = lambda v: float(v.detach()) if torch.is_tensor(v) else float(v)  # noqa: E731
    assert as_float(value) == pytest.approx(as_float(expected), rel=tol, abs=tol)


def task_bounds(y):
    """[lo, hi) of each label's own task (2 classes per task)."""
    return (y // 2 * 2).tolist(), (y // 2 * 2 + 2).tolist()


# ============================================================ prompt methods ======================================
def _prompt_at(name, task_index, *overrides):
    method = build(name, *VIT, *overrides)
    for t in range(task_index + 1):
        start(method, t)
    perturb(method.network.fc, seed=3)
    return method


def _prefix(prompts):
    """(B, n, 2, L, D) prompts of one block -> (B, 2, n * L, D) prefix keys and values."""
    b, n, two, length, d = prompts.shape
    return prompts.permute(0, 2, 1, 3, 4).reshape(b, two, n * length, d)


@known_answer("l2p")
def test_l2p_picks_the_top_k_keys_by_cosine_masks_other_tasks_and_pulls_the_keys():
    method = _prompt_at("l2p", 1)
    pool, vit = method.pool, method.network.backbone
    x = torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    y = torch.tensor([2, 3, 2])
    method.train()
    losses = method.training_step(x, y)
    q = vit.query(x)
    cos = unit(q) @ unit(pool.keys).T
    top = cos.topk(method.cfg.top_k, dim=1)
    prefixes = {layer: _prefix(pool.prompts[top.indices][:, :, j]) for j, layer in enumerate(pool.layers)}
    z = method.network.fc(vit(x, prefixes))
    close(losses["ce"], ce(z, y, 2, 4))  # the current task's classes only
    close(losses["pull"], method.cfg.pull_weight * (1 - top.values).sum(1).mean())
    method.eval()
    with torch.no_grad():
        torch.testing.assert_close(method.predict(x)["cnn"], z[:, :4], atol=1e-5, rtol=1e-5)


@known_answer("l2p")
@pytest.mark.parametrize("value, layers", [("true", [0]), ("false", [0, 1, 2, 3, 4])])
def test_l2p_shallow_or_deep_puts_the_prompts_at_the_input_or_in_every_early_block(value, layers):
    method = build("l2p", *VIT, "--shallow_or_deep", value)
    assert method.pool.layers == layers
    with pytest.raises(UserError, match="shallow_or_deep"):
        build("l2p", *VIT, "--shallow_or_deep", value, "--prompt_layers", "1", "2")


@known_answer("dual_prompt")
def test_dual_prompt_trains_the_tasks_e_prompt_with_the_g_prompt_and_routes_by_the_closest_key():
    method = _prompt_at("dual_prompt", 1)
    vit, g, e = method.network.backbone, method.g_prompt, method.e_prompts
    x = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(2))
    y = torch.tensor([2, 3, 3, 2])

    def prefixes(task_ids):
        out = {}
        for j, layer in enumerate(g.layers):
            out[layer] = _prefix(g.prompts[torch.zeros_like(task_ids)][:, None, j])
        for j, layer in enumerate(e.layers):
            p = _prefix(e.prompts[task_ids][:, None, j])
            out[layer] = torch.cat([out[layer], p], 2) if layer in out else p
        return out

    method.train()
    losses = method.training_step(x, y)
    q = vit.query(x)
    cos = unit(q) @ unit(e.keys).T
    z = method.network.fc(vit(x, prefixes(torch.ones(4, dtype=torch.long))))
    close(losses["ce"], ce(z, y, 2, 4))
    close(losses["pull"], method.cfg.pull_weight * (1 - cos[:, 1]).mean())
    method.eval()
    with torch.no_grad():
        scores = method.predict(x)
        routed = cos[:, :2].argmax(1)  # among the seen tasks' keys
        torch.testing.assert_close(scores["cnn"], method.network.fc(vit(x, prefixes(routed)))[:, :4], atol=1e-5,
                                   rtol=1e-5)
    assert torch.equal(scores["task_id"], routed)


@known_answer("coda_prompt")
def test_coda_prompt_weights_the_components_by_attended_cosine_and_penalises_non_orthogonality():
    method = _prompt_at("coda_prompt", 1, "--ortho_weight", "0.5")
    vit, comp = method.network.backbone, method.prompt
    with torch.no_grad():  # components away from orthonormal, so the penalty is not zero
        for t in range(comp.n_slices):
            for name in ("key", "attention", "prompt"):
                getattr(comp, f"{name}_{t}").mul_(1.5).add_(0.1)
    x = torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(3))
    y = torch.tensor([3, 2, 2])
    method.train()
    losses = method.training_step(x, y)
    K, A, P = (torch.cat([getattr(comp, f"{n}_{t}") for t in range(comp.n_slices)], 1)
               for n in ("key", "attention", "prompt"))
    q = vit.query(x)
    prefixes = {}
    for j, layer in enumerate(comp.layers):
        attended = q[:, None, :] * A[j][None]  # (B, M, D)
        alpha = (attended * K[j][None]).sum(2) / (attended.norm(dim=2) * K[j].norm(dim=1)[None])
        prefixes[layer] = torch.einsum("bm,mtld->btld", alpha, P[j])
    z = method.network.fc(vit(x, prefixes))
    close(losses["ce"], ce(z, y, 2, 4))
    penalty = 0.0
    for M in (K, A, P.flatten(2)):
        for j in range(len(comp.layers)):
            gram = M[j] @ M[j].T
            penalty = penalty + ((gram - torch.eye(len(gram))) ** 2).mean()
    close(losses["ortho"], 0.5 * penalty, tol=1e-4)
