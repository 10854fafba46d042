"""Exemplar selection and budgets."""
import numpy as np
import torch
from torch.nn import functional as F

from utils.memory import ExemplarMemory, closest_to_mean, herding


def test_herding_first_pick_is_closest_to_mean_and_then_balances():
    feats = F.normalize(torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.7, 0.7], [0.9, 0.1]]), dim=1)
    order = herding(feats, 3)
    # the diagonal vector is nearest to the mean; the next picks keep the running mean on the diagonal
    assert order[0] == 2
    assert len(set(order.tolist())) == 3


def test_herding_running_mean_approaches_class_mean():
    torch.manual_seed(0)
    feats = F.normalize(torch.randn(200, 8), dim=1)
    mean = feats.mean(0)
    order = herding(feats, 20)
    random_subset = torch.randperm(200)[:20]
    assert (feats[order].mean(0) - mean).norm() < (feats[random_subset].mean(0) - mean).norm()


def test_closest_to_mean_picks_nearest():
    feats = F.normalize(torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.8, 0.6]]), dim=1)
    assert closest_to_mean(feats, 1).tolist() == [2]


class _FakeData:
    """A DataManager stand-in with real arrays: 4 classes x 10 samples."""

    def __init__(self):
        self.train_y = np.repeat(np.arange(4), 10)

    def indices(self, split, classes):
        return np.flatnonzero(np.isin(self.train_y, list(classes)))

    def dataset(self, split, indices, augment=None):
        return indices


def _features(indices):
    return torch.as_tensor(np.stack([np.cos(indices), np.sin(indices)], 1), dtype=torch.float32)


def test_total_budget_is_rebalanced_and_keeps_priority_order():
    data = _FakeData()
    memory = ExemplarMemory(8, False, None, "herding", n_classes=4, seed=0)
    memory.update([0, 1], 2, data, _features)
    first = memory.exemplars[0].copy()
    assert [len(v) for v in memory.exemplars.values()] == [4, 4]
    memory.update([2, 3], 4, data, _features)
    assert [len(memory.exemplars[c]) for c in range(4)] == [2, 2, 2, 2]
    assert memory.exemplars[0].tolist() == first[:2].tolist()
    assert all(data.train_y[memory.exemplars[c]].tolist() == [c, c] for c in range(4))


def test_fixed_per_class_budget_and_random_is_seeded():
    data = _FakeData()
    a = ExemplarMemory(0, True, 3, "random", n_classes=4, seed=5)
    b = ExemplarMemory(0, True, 3, "random", n_classes=4, seed=5)
    for m in (a, b):
        m.update([0, 1], 2, data, _features)
        m.update([2, 3], 4, data, _features)
    assert len(a) == 12 and all(len(v) == 3 for v in a.exemplars.values())
    assert np.array_equal(a.indices(), b.indices())


def test_state_round_trip():
    data = _FakeData()
    memory = ExemplarMemory(8, False, None, "herding", n_classes=4, seed=0)
    memory.update([0, 1], 2, data, _features)
    other = ExemplarMemory(8, False, None, "herding", n_classes=4, seed=0)
    other.load_state_dict(memory.state_dict())
    assert np.array_equal(other.indices(), memory.indices())
