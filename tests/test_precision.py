"""Precision is explicit: what the code says is computed in float32 stays float32 under bfloat16 autocast (a matrix
product inside autocast would re-cast its float32 inputs to bfloat16), and the engine picks the autocast of each
device by the table of trainer/engine/fastpath.py. Each check compares the computation under autocast with the same
computation with autocast off: equal to float32 rounding, which a bfloat16 product (8 bits of mantissa) is not."""
import pytest
import torch
from torch.nn import functional as F

from backbone.cosine_linear import CosineClassifier
from backbone.prompt import CodaComponents, PromptPool
from trainer.engine.engine import Engine
from trainer.engine.fastpath import reduced_precision
from utils import losses

BF16 = dict(device_type="cpu", dtype=torch.bfloat16)


def _both(fn):
    """fn() with autocast off and under bfloat16 autocast."""
    exact = fn()
    with torch.autocast(**BF16):
        autocast = fn()
    return exact, autocast


def _same(exact, autocast):
    for a, b in zip(exact if isinstance(exact, tuple) else [exact], autocast if isinstance(autocast, tuple)
                    else [autocast]):
        assert b.dtype == a.dtype == torch.float32
        torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-6)


g = torch.Generator().manual_seed(0)
Z, Y = torch.randn(8, 6, generator=g), torch.randint(0, 6, (8,), generator=g)
Q, K, N = (F.normalize(torch.randn(n, 32, generator=g), dim=1) for n in (8, 8, 64))
MAPS = [torch.rand(8, 4, 5, 5, generator=g) for _ in range(2)]
M = torch.randn(2, 5, 32, generator=g)


@pytest.mark.parametrize("name, fn", [
    ("bounded_ce", lambda: losses.bounded_ce(Z, Y, 0, 6)),
    ("others_cross_entropy", lambda: losses.others_cross_entropy(Z, Y, 2, 5)),
    ("nca_loss", lambda: losses.nca_loss(Z, Y, 0.6)),
    ("margin_ranking_loss", lambda: losses.margin_ranking_loss(Z.tanh(), Y, 3, 2, 0.5)),
    ("kd_loss", lambda: losses.kd_loss(Z, Z.flip(0), 2.0)),
    ("feature_distillation", lambda: losses.feature_distillation(Q, K)),
    ("pod_spatial", lambda: losses.pod_spatial(MAPS, [m.flip(0) for m in MAPS])),
    ("key_matching_loss", lambda: losses.key_matching_loss(Q[:, :3])),
    ("orthogonality_penalty", lambda: losses.orthogonality_penalty(M)),
    ("info_nce", lambda: losses.info_nce(Q, K, N, 0.2)),
    ("simsiam_loss", lambda: losses.simsiam_loss(Q, K, K.flip(0), Q.flip(0))),
    ("weighted_squared_distance", lambda: losses.weighted_squared_distance(Z, Z.flip(0), Z.abs())),
])
def test_every_loss_is_float32_under_autocast(name, fn):
    _same(*_both(fn))


def test_prompt_key_matching_and_coda_attention_weights_are_float32_under_autocast():
    torch.manual_seed(0)
    pool = PromptPool(10, 2, [0, 1], 32)
    exact, autocast = _both(lambda: pool.match(Q, 3))
    assert torch.equal(exact[0], autocast[0])  # the same keys are picked
    _same(exact[1], autocast[1])
    components = CodaComponents(2, [0, 1], 32)
    components.add_components(4)
    exact, autocast = _both(lambda: tuple(components(Q * 3).values()))
    _same(exact, autocast)


def test_cosine_classifier_scores_are_float32_under_autocast():
    torch.manual_seed(0)
    head = CosineClassifier(32, nb_proxy=2, max_sigma=16.0)
    head.add_classes(3)
    _same(*_both(lambda: head(Q)))


def test_the_engine_picks_the_autocast_of_each_device():
    assert reduced_precision("cuda", (8, 0), False) == torch.bfloat16  # A100, H100, RTX 30/40
    assert reduced_precision("cuda", (7, 5), False) == torch.float16  # T4, RTX 20: no bfloat16 units
    assert reduced_precision("cuda", (7, 0), False) == torch.float16  # V100
    assert reduced_precision("cpu", None, True) == torch.bfloat16  # AVX512-BF16 or AMX
    assert reduced_precision("cpu", None, False) is None  # emulated bfloat16 would be ten times slower
    assert reduced_precision("mps", None, False) is None
    assert reduced_precision("cpu", None, False, "bfloat16") == torch.bfloat16  # CL_AUTOCAST forces it
    assert reduced_precision("cuda", (9, 0), False, "off") is None
    assert Engine(torch.device("cpu"), amp=False).autocast_dtype is None
    assert Engine(torch.device("cpu"), dtype=torch.float64).autocast_dtype is None


@pytest.mark.parametrize("mode", ["bfloat16", "float16"])
def test_forced_autocast_trains_and_float16_scales_the_gradients(mode, monkeypatch):
    """The reduced-precision paths on any CPU: bfloat16, and float16 with gradient scaling (what a GPU before
    compute capability 8.0 runs). The loss stays float32 and finite; the scaler's state survives a checkpoint."""
    from utils.types import OptimConfig, Stage, Task

    monkeypatch.setenv("CL_AUTOCAST", mode)
    engine = Engine(torch.device("cpu"))
    assert engine.autocast_dtype == getattr(torch, mode) and (engine.scaler() is not None) == (mode == "float16")
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.Flatten(), torch.nn.Linear(4 * 6 * 6, 3))
    method = torch.nn.Module()
    method.network, method.before_optimizer_step = net, lambda: None
    seen = []

    def step(x, y):
        loss = losses.bounded_ce(net(x), y, 0, 3)
        seen.append(loss.dtype)
        return {"ce": loss}

    data = torch.utils.data.TensorDataset(torch.randn(32, 3, 8, 8), torch.randint(0, 3, (32,)))
    ends = []
    engine.register(type("Record", (), {"after_epoch": lambda self, end: ends.append(end)})())
    before = [p.detach().clone() for p in net.parameters()]
    engine.fit(method, Task(0, 0, 3, 1), Stage("s", lambda: data, OptimConfig(epochs=2, lrate=0.1, batch_size=8),
                                               step))
    assert set(seen) == {torch.float32}
    assert any(not torch.equal(a, b) for a, b in zip(before, net.parameters()))
    assert (ends[-1].scaler is not None) == (mode == "float16")
    if mode == "float16":
        state = ends[-1].scaler.state_dict()
        assert isinstance(state["scale"], float) and state["scale"] > 0
