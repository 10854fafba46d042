"""Prompt methods (l2p, dual_prompt, coda_prompt) on a tiny random-weight timm ViT: prefix injection, prompt
selection, frozen backbone, masked CE, CODA's component slices, checkpoint round trip, weights from files.

Known answers: each method's CE over the current task's classes and its prompt losses recomputed on a fixed batch,
with the prompts written out as prefix keys and values (_prefix) of the ViT's blocks: L2P's top-k keys by cosine
and key pull, DualPrompt's G- and E-prompts and routing by the closest key, CODA-Prompt's components weighted by
the attended cosine and its orthogonality penalty; and the predictions at test time. The formulas are in
tests/formulas.py, the builders of a method on the digits fixture in tests/method_builders.py (`build(name, *VIT)`,
at 16 px: one patch, two classes per task); the behaviour tests build on the TINY settings (`build_seeded`).

To add a method of this family, copy the test of L2P
(test_l2p_picks_the_top_k_keys_by_cosine_masks_other_tasks_and_pulls_the_keys).
"""
import os

import pytest
import torch
from torch.nn import functional as F

from conftest import ROOT, TINY, known_answer
from backbone.prompt import PromptPool, concat_prefixes
from backbone.vit import PromptedViT, prompted_vit_net
from datasets.scenario import DataManager
from formulas import ce, close, unit
from method_builders import VIT, build, perturb, start
from methods import build_method, method_config
from trainer.cli import parse_overrides as parse_cli_overrides
from trainer.config_loader import load_config
from trainer.flops import inference_cost
from utils.losses import bounded_ce, key_matching_loss, orthogonality_penalty
from utils.registry import UserError
from trainer.engine.engine import Engine
from utils.types import OptimConfig, Stage

METHODS = ("l2p", "dual_prompt", "coda_prompt")


def config(method, *overrides):
    return load_config(os.path.join(ROOT, "options", method, "digits.yaml"),
                       parse_cli_overrides([*TINY, *overrides]), method_config)


def build_seeded(method, *overrides):
    """The method on the TINY settings (two tasks of 5 classes, 16 px), torch seeded first."""
    torch.manual_seed(0)
    cfg = config(method, *overrides)
    return build_method(cfg, DataManager(cfg, seed=1))


def start_task(method, index):
    method.begin_task(method.data.tasks[index])


def train_step(method, n=16):
    """One real optimiser step of the shared loop on n samples of the current task."""
    data = method.data
    subset = data.dataset("train", data.indices("train", method.task.classes)[:n])
    opt = OptimConfig(epochs=1, lrate=0.01, batch_size=n, opt_type="adam")
    Engine(torch.device("cpu")).fit(method, method.task, Stage("train", lambda: subset, opt, method.training_step))


@pytest.fixture(scope="module")
def vit():
    import timm

    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, img_size=32).eval()


def test_prefix_injection_matches_timm_without_prompts(vit):
    net = PromptedViT(vit, 32).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        reference = vit.forward_head(vit.forward_features(x), pre_logits=True)
        empty = {i: torch.zeros(2, 2, 0, 192) for i in range(net.depth)}
        prompted = net(x, {0: torch.randn(2, 2, 3, 192)})
        traced = torch.jit.trace(lambda x: net(x, {0: torch.ones(2, 2, 3, 192)}), x)(x)
    torch.testing.assert_close(net(x), reference)
    torch.testing.assert_close(net(x, empty), reference)
    assert (prompted - reference).abs().max() > 1e-3  # a prompt does change the output
    torch.testing.assert_close(traced, net(x, {0: torch.ones(2, 2, 3, 192)}))  # fvcore's path = the SDPA path


def test_pool_selects_the_closest_keys():
    pool = PromptPool(6, 2, [0, 3], 8)
    with torch.no_grad():
        pool.keys.copy_(torch.eye(6, 8) * torch.arange(1.0, 7.0)[:, None])  # key i along axis i, any length
    query = torch.zeros(2, 8)
    query[0, [2, 4, 1]] = torch.tensor([3.0, 2.0, 1.0])
    query[1, 5] = -1.0
    query[1, 0] = 0.5
    idx, cos = pool.match(query, 3)
    assert idx[0].tolist() == [2, 4, 1]
    torch.testing.assert_close(cos[0], torch.tensor([3.0, 2.0, 1.0]) / 14 ** 0.5)
    assert idx[1, 0] == 0 and 5 not in idx[1].tolist()  # the opposed key comes last
    assert pool.match(query, 1, among=2)[0][:, 0].tolist() == [1, 0]  # only the first two keys compete
    prefixes = pool(idx)
    assert sorted(prefixes) == [0, 3] and prefixes[3].shape == (2, 2, 3 * 2, 8)
    torch.testing.assert_close(prefixes[3][0, :, 2:4], pool.prompts[4, 1])  # second pick, second block
    merged = concat_prefixes(prefixes, {3: torch.zeros(2, 2, 1, 8), 5: torch.ones(2, 2, 1, 8)})
    assert merged[3].shape == (2, 2, 7, 8) and torch.equal(merged[0], prefixes[0]) and merged[5].shape[2] == 1


def test_masked_ce_ignores_other_tasks_logits():
    logits, y = torch.randn(4, 10, requires_grad=True), torch.tensor([4, 5, 5, 4])
    loss = bounded_ce(logits, y, 4, 6)
    loss.backward()
    changed = logits.detach().clone()
    changed[:, :4] += 100.0  # old classes, and classes of later tasks
    changed[:, 6:] -= 100.0
    assert bounded_ce(changed, y, 4, 6) == pytest.approx(loss.item())
    assert loss.item() == pytest.approx(F.cross_entropy(logits.detach()[:, 4:6], y - 4).item())
    assert logits.grad[:, :4].abs().sum() == 0 and logits.grad[:, 6:].abs().sum() == 0
    assert logits.grad[:, 4:6].abs().sum() > 0


def test_key_matching_and_orthogonality_losses():
    assert key_matching_loss(torch.tensor([[1.0, 0.5], [0.0, -1.0]])).item() == pytest.approx((0.5 + 3.0) / 2)
    assert orthogonality_penalty(torch.eye(3, 5)).item() == 0.0
    assert orthogonality_penalty(2 * torch.eye(3, 5)).item() == pytest.approx(3 * 9 / 9)  # (4 - 1)^2, 3 of 9


@pytest.mark.parametrize("name", METHODS)
def test_training_step_changes_prompts_and_head_but_not_the_vit(name):
    method = build_seeded(name)
    start_task(method, 0)
    vit_before = {k: v.clone() for k, v in method.network.backbone.state_dict().items()}
    trained_before = [p.detach().clone() for p in method.parameters() if p.requires_grad]
    train_step(method)
    for k, v in method.network.backbone.state_dict().items():
        assert torch.equal(v, vit_before[k]), k
    trained_after = [p for p in method.parameters() if p.requires_grad]
    assert all(not torch.equal(a, b) for a, b in zip(trained_before, trained_after) if a.numel())
    assert not any(p.requires_grad for p in method.network.backbone.parameters())


def test_dual_prompt_trains_the_tasks_own_e_prompt_and_routes_at_test():
    method = build_seeded("dual_prompt")
    start_task(method, 0)
    start_task(method, 1)
    x, y = torch.randn(3, 3, 16, 16), torch.tensor([5, 6, 7])
    sum(method.training_step(x, y).values()).backward()
    grad = method.e_prompts.prompts.grad.flatten(1).abs().sum(1)
    assert grad[1] > 0 and grad[torch.arange(len(grad)) != 1].sum() == 0
    assert method.e_prompts.keys.grad.abs().sum(1).nonzero().flatten().tolist() == [1]
    method.eval()
    with torch.no_grad():
        scores = method.predict(x)
    assert scores["cnn"].shape == (3, 10) and set(scores["task_id"].tolist()) <= {0, 1}


def test_coda_adds_orthogonal_slices_and_freezes_the_old_ones():
    method = build_seeded("coda_prompt", "--prompt_pool", "7")
    start_task(method, 0)
    train_step(method)
    start_task(method, 1)
    components = method.prompt
    slices = [{n: getattr(components, f"{n}_{t}") for n in ("key", "attention", "prompt")} for t in (0, 1)]
    assert [s["key"].shape[1] for s in slices] == [3, 4]  # 7 split over 2 tasks
    assert not any(p.requires_grad for p in slices[0].values()) and all(p.requires_grad for p in slices[1].values())
    for name in ("key", "attention", "prompt"):
        old, new = (s[name].detach().flatten(2) for s in slices)
        gram = new @ new.transpose(1, 2)
        torch.testing.assert_close(gram, torch.eye(4).expand_as(gram), atol=1e-5, rtol=0)
        assert (old @ new.transpose(1, 2)).abs().max() < 1e-5
    query = torch.randn(2, 192)
    assert set(components(query)) == set(method.cfg.prompt_layers)


@pytest.mark.parametrize("name", METHODS)
def test_checkpoint_restores_prompts_and_keys(name):
    method = build_seeded(name)
    start_task(method, 0)
    train_step(method)
    start_task(method, 1)
    state = method.state_dict()
    restored = build_seeded(name)
    torch.manual_seed(123)  # the replayed begin_task draws different fresh components; loading overwrites them
    for index in (0, 1):
        start_task(restored, index)
    restored.load_state_dict(state)
    loaded = restored.state_dict()
    for k, v in state.items():
        assert torch.equal(loaded[k], v), k
    x = torch.randn(2, 3, 16, 16)
    method.eval()
    restored.eval()
    torch.testing.assert_close(restored.predict(x)["cnn"], method.predict(x)["cnn"])


def test_gflops_count_the_query_and_the_prompted_pass():
    from fvcore.nn import FlopCountAnalysis

    method = build_seeded("l2p")
    start_task(method, 0)
    one_pass = FlopCountAnalysis(method.network.backbone.eval(), torch.zeros(1, 3, 16, 16)).total()
    assert inference_cost(method, 16, torch.device("cpu"))[0] * 1e9 > 1.9 * one_pass


@pytest.mark.parametrize("name, overrides, message", [
    ("l2p", ["--top_k", "11"], "top_k"),
    ("l2p", ["--prompt_layers", "0", "12"], "prompt_layers"),
    ("dual_prompt", ["--e_prompt_pool", "1"], "e_prompt_pool"),
    ("dual_prompt", ["--g_prompt_length", "-1"], "negative"),
    ("coda_prompt", ["--prompt_pool", "500"], "prompt_pool"),
    ("l2p", ["--img_size", "24"], "multiple of the ViT's patch size"),
])
def test_bad_settings_are_user_errors(name, overrides, message):
    with pytest.raises(UserError, match=message):
        build_seeded(name, *overrides)


@pytest.mark.parametrize("backbone", ["resnet18", "no_such_vit"])
def test_other_backbones_are_refused(backbone):
    with pytest.raises(UserError, match="timm"):
        prompted_vit_net(backbone, False, None, 32)


def test_weights_come_from_pretrain_path_or_fail(tmp_path, monkeypatch):
    import huggingface_hub
    import timm

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "empty_cache"))
    cfg = config("l2p", "--pretrained", "true")
    with pytest.raises(UserError, match="no local weights"):
        prompted_vit_net(cfg.backbone, True, None, 32)
    torch.manual_seed(1)
    source = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0)
    path = str(tmp_path / "vit_tiny.pth")
    torch.save(source.state_dict(), path)
    vit = prompted_vit_net(cfg.backbone, True, path, 32).backbone.vit
    assert torch.equal(vit.blocks[3].attn.qkv.weight, source.blocks[3].attn.qkv.weight)
    assert vit.pos_embed.shape == (1, 1 + 4, 192)  # resampled from 14 x 14 patches to 2 x 2
    torch.testing.assert_close(vit.pos_embed[:, 0], source.pos_embed[:, 0])  # the [CLS] position is kept


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
        prefixes[layer] = torch.einsum("bm,mtld->btld", alpha.double(), P[j].double()).float()  # float32, as documented
    z = method.network.fc(vit(x, prefixes))
    close(losses["ce"], ce(z, y, 2, 4))
    penalty = 0.0
    for M in (K, A, P.flatten(2)):
        for j in range(len(comp.layers)):
            gram = M[j].double() @ M[j].double().T
            penalty = penalty + ((gram - torch.eye(len(gram))) ** 2).mean()
    close(losses["ortho"], 0.5 * penalty, tol=1e-4)
