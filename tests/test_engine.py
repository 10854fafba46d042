"""The shared loops: what they draw from the global RNG, and the modes they leave modules in."""
import torch
from torch.utils.data import TensorDataset

from trainer.engine.engine import Engine


def test_inference_draws_nothing_from_the_global_rng():
    engine = Engine(torch.device("cpu"))
    data = TensorDataset(torch.randn(10, 3), torch.zeros(10, dtype=torch.long))
    module = torch.nn.Linear(3, 2)
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    out, y = engine.infer(module, data, module, batch_size=4)
    assert out.shape == (10, 2) and torch.equal(torch.rand(3), expected)


def test_inference_restores_every_module_mode():
    engine = Engine(torch.device("cpu"))
    net = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.BatchNorm1d(3))
    net.train()
    net[1].eval()  # a frozen part kept in eval mode by its method
    engine.infer(net, TensorDataset(torch.randn(4, 3), torch.zeros(4, dtype=torch.long)), net)
    assert net.training and net[0].training and not net[1].training


# ---- the data path ----
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from torchvision import transforms as T  # noqa: E402
from torchvision.transforms import functional as TF  # noqa: E402

from datasets._augment import Brightness, RandomCrop, RandomHorizontalFlip, batched  # noqa: E402
from datasets.base import CLDataset, Pool, PoolView  # noqa: E402
from utils.memory import FeatureCache  # noqa: E402
from trainer.engine.batches import epoch_key  # noqa: E402
from trainer.engine.engine import NonFiniteLoss  # noqa: E402
from utils.types import OptimConfig, Stage, Task  # noqa: E402


class _Spec(CLDataset):
    """An in-memory dataset with CIFAR's augmentations (crop with padding, flip)."""

    n_classes, img_size = 3, 8
    mean, std = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)

    def train_augment(self):
        return [T.RandomCrop(8, padding=2), T.RandomHorizontalFlip()]


def _pool(batched_path=True, n=12, size=8):
    images = np.random.default_rng(0).integers(0, 256, (n, 8, 8, 3), dtype=np.uint8)
    return Pool(_Spec(), images, np.arange(n) % 3, size, batched_path)


def test_batched_crop_flip_and_brightness_follow_torchvision():
    x = torch.rand(4, 3, 6, 6)
    crop = RandomCrop(6, padding=2)
    g = torch.Generator().manual_seed(0)
    out = crop(x, g)
    g = torch.Generator().manual_seed(0)  # the same draws: offsets per image
    top, left = torch.randint(0, 5, (4,), generator=g), torch.randint(0, 5, (4,), generator=g)
    for i in range(4):
        expected = TF.crop(TF.pad(x[i], [2]), int(top[i]), int(left[i]), 6, 6)
        assert torch.equal(out[i], expected)
    assert len({(int(a), int(b)) for a, b in zip(top, left)}) > 1  # each image its own offset
    assert torch.equal(RandomHorizontalFlip(1.0)(x, None), TF.hflip(x))
    assert torch.equal(RandomHorizontalFlip(0.0)(x, None), x)
    flips = RandomHorizontalFlip(0.5)(torch.arange(2.0).view(1, 1, 1, 2).repeat(2000, 1, 1, 1), None)
    assert 0.45 < float((flips[:, 0, 0, 0] == 1).float().mean()) < 0.55
    assert torch.allclose(Brightness(1.5, 1.5)(x, None), TF.adjust_brightness(x, 1.5))


def test_torchvision_augmentations_translate_or_fall_back():
    ops = batched([T.RandomCrop(32, padding=4), T.RandomHorizontalFlip(), T.ColorJitter(brightness=0.25)])
    assert [type(op) for op in ops] == [RandomCrop, RandomHorizontalFlip, Brightness]
    assert (ops[0].padding, ops[1].p, ops[2].low, ops[2].high) == (4, 0.5, 0.75, 1.25)
    assert batched([T.RandomRotation(20)]) is None and batched([T.ColorJitter(contrast=0.4)]) is None


def test_batched_and_per_sample_paths_agree_without_augmentation():
    for size, tolerance in ((8, 1e-5), (16, 0.12)):  # resizing: PIL's and torch's bilinear filters differ a little
        fast, slow = PoolView(_pool(True, size=size), np.arange(12), False), PoolView(_pool(False, size=size),
                                                                                     np.arange(12), False)
        x, y = fast.batch(torch.arange(12), torch.device("cpu"))
        reference = torch.stack([slow[i][0] for i in range(12)])
        assert x.shape == reference.shape == (12, 3, size, size)
        assert float((x - reference).abs().max()) < tolerance and y.tolist() == [i % 3 for i in range(12)]


def test_views_of_one_pool_add_up_to_one_view():
    pool = _pool()
    view = PoolView(pool, np.arange(4), True) + PoolView(pool, np.arange(8, 12), True)
    assert isinstance(view, PoolView) and view.indices.tolist() == [0, 1, 2, 3, 8, 9, 10, 11] and view.batched
    x, y, positions = view.with_positions().batch(torch.tensor([5]), torch.device("cpu"))
    assert positions.tolist() == [9] and y.tolist() == [0]


def _epoch_batches(engine, dataset, key, batch_size=4):
    return [tuple(t.clone() for t in b) for b in engine.batches(dataset, batch_size, shuffle=True).epoch(key)]


def test_an_epoch_depends_on_its_key_only_not_on_workers_or_the_global_rng():
    for batched_path in (True, False):
        view = PoolView(_pool(batched_path), np.arange(12), True)
        torch.manual_seed(1)
        first = _epoch_batches(Engine(torch.device("cpu")), view, key=7)
        torch.manual_seed(2)
        again = _epoch_batches(Engine(torch.device("cpu"), num_workers=0 if batched_path else 2), view, key=7)
        other = _epoch_batches(Engine(torch.device("cpu")), view, key=8)
        assert len(first) == 3 and all(torch.equal(a, b) for x, y in zip(first, again) for a, b in zip(x, y))
        assert not all(torch.equal(x[0], y[0]) for x, y in zip(first, other))
    assert epoch_key(1, 0, "train", 0) == epoch_key(1, 0, "train", 0) != epoch_key(1, 0, "train", 1)
    assert epoch_key(1, 0, "train", 0) not in (epoch_key(2, 0, "train", 0), epoch_key(1, 0, "bias", 0))


def test_every_sample_is_seen_once_per_epoch_but_a_lone_last_one():
    engine = Engine(torch.device("cpu"))
    for batched_path in (True, False):
        view = PoolView(_pool(batched_path), np.arange(10), True)
        assert [len(b[1]) for b in engine.batches(view, 4, shuffle=True).epoch(0)] == [4, 4, 2]
        assert sorted(torch.cat([b[1] for b in engine.batches(view, 3, shuffle=True).epoch(0)]).tolist()) != \
            sorted(view.targets.tolist())  # 10 = 3 * 3 + 1: the single last sample is dropped in training
        assert [len(b[1]) for b in engine.batches(view, 3, shuffle=False).epoch(0)] == [3, 3, 3, 1]


class _Exploding(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.ones(1))

    def before_optimizer_step(self):
        pass

    def step(self, x, y):
        return {"loss": (self.w * 1e30).sum()}  # finite loss, but the update sends w to -inf


class _Counter:
    calls = 0

    def after_epoch(self, end):
        self.calls += 1


def test_weights_that_become_non_finite_stop_before_any_hook_saves():
    engine, counter, method = Engine(torch.device("cpu")), _Counter(), _Exploding()
    engine.register(counter)
    data = torch.utils.data.TensorDataset(torch.zeros(4, 1), torch.zeros(4, dtype=torch.long))
    stage = Stage("train", lambda: data, OptimConfig(epochs=2, lrate=1e30, batch_size=4, opt_mom=0.0), method.step)
    with pytest.raises(NonFiniteLoss, match="task 0, stage 'train', epoch 1.*'w'"):
        engine.fit(method, Task(0, 0, 2, 1), stage)
    assert counter.calls == 0


def test_feature_cache_computes_each_position_once():
    asked = []

    def compute(positions):
        asked.append(positions.tolist())
        return torch.as_tensor(positions, dtype=torch.float32)[:, None] * 2

    cache = FeatureCache(compute)
    assert cache(np.array([5, 1, 3])).flatten().tolist() == [10, 2, 6]
    assert cache(np.array([3, 7, 5])).flatten().tolist() == [6, 14, 10]
    assert asked == [[1, 3, 5], [7]]


def test_autocast_only_where_it_pays_off_and_losses_stay_float32(monkeypatch):
    from trainer.engine.fastpath import cpu_bf16_native
    from utils.losses import bounded_ce

    monkeypatch.delenv("CL_AUTOCAST", raising=False)  # this machine's own choice
    assert Engine(torch.device("cpu"), amp=True).amp == cpu_bf16_native()
    assert not Engine(torch.device("cpu"), amp=False).amp
    monkeypatch.setenv("CL_AUTOCAST", "bfloat16")  # forced, to run the autocast path on any CPU
    engine = Engine(torch.device("cpu"))
    net = torch.nn.Linear(3, 4)
    with engine.autocast():
        logits = net(torch.randn(5, 3))
        loss = bounded_ce(logits, torch.tensor([0, 1, 2, 3, 0]), 0, 4)
    assert logits.dtype == torch.bfloat16 and loss.dtype == torch.float32
