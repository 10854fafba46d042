"""Exemplar selection and budgets."""
import numpy as np
import torch
from torch.nn import functional as F

from utils.memory import ExemplarMemory, closest_to_mean, herding


def test_herding_first_pick_is_closest_to_mean_and_then_balances():
    feats = F.normalize(torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.7, 0.7], [0.9, 0.1]]), dim=1)
    # mean (0.675, 0.454): the diagonal is nearest; then [0.9, 0.1] keeps the running mean closest; then the
    # vertical [0, 1] balances the two right-leaning picks, although [1, 0] is nearer to the mean on its own
    assert herding(feats, 4).tolist() == [2, 3, 1, 0]
    assert herding(feats, 2).tolist() == [2, 3]
    assert closest_to_mean(feats, 4).tolist() == [2, 3, 0, 1]  # the greedy order differs from nearest-first


def _herding_by_hand(features, m):
    """Welling's herding: pick k minimises || mean - (sum of the k - 1 picks + f) / k ||."""
    mean = features.mean(0)
    picked = []
    for k in range(1, m + 1):
        best, best_dist = None, float("inf")
        for i in range(len(features)):
            if i in picked:
                continue
            dist = float((mean - (features[picked].sum(0) + features[i]) / k).norm())
            if dist < best_dist:
                best, best_dist = i, dist
        picked.append(best)
    return picked


def test_herding_matches_the_greedy_rule_on_random_features():
    torch.manual_seed(1)
    feats = F.normalize(torch.randn(40, 5), dim=1)
    assert herding(feats, 12).tolist() == _herding_by_hand(feats, 12)


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
    """2-d features of train-pool positions, with lengths that vary (the memory normalises them)."""
    scale = 1.0 + (np.asarray(indices) % 7)
    return torch.as_tensor(np.stack([np.cos(indices), np.sin(indices)], 1) * scale[:, None], dtype=torch.float32)


def _unit(indices):
    return F.normalize(_features(indices), dim=1)


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


def test_update_herds_each_new_class_on_its_normalised_features():
    data = _FakeData()
    memory = ExemplarMemory(8, False, None, "herding", n_classes=4, seed=0)
    memory.update([0, 1], 2, data, _features)
    for c in (0, 1):
        pool = data.indices("train", [c])
        assert memory.exemplars[c].tolist() == pool[_herding_by_hand(_unit(pool), 4)].tolist()


def test_fixed_per_class_budget_keeps_old_exemplars_and_defaults_to_an_even_share():
    data = _FakeData()
    memory = ExemplarMemory(0, True, 3, "herding", n_classes=4, seed=0)
    memory.update([0, 1], 2, data, _features)
    first = {c: v.copy() for c, v in memory.exemplars.items()}
    memory.update([2, 3], 4, data, _features)
    assert [len(memory.exemplars[c]) for c in range(4)] == [3, 3, 3, 3]
    assert all(np.array_equal(memory.exemplars[c], first[c]) for c in (0, 1))  # not shrunk by the new task
    assert ExemplarMemory(20, True, None, "herding", n_classes=4, seed=0).quota(2) == 5  # memory_size // classes
    assert ExemplarMemory(20, False, None, "herding", n_classes=4, seed=0).quota(3) == 6  # memory_size // seen


def test_balanced_set_adds_as_many_of_each_new_class_and_leaves_the_memory_alone():
    from utils.types import Task

    data = _FakeData()
    memory = ExemplarMemory(8, False, None, "herding", n_classes=4, seed=0)
    memory.update([0, 1], 2, data, _features)
    before = memory.indices().copy()
    balanced = memory.balanced_indices(Task(1, 2, 4, 2), data, _features)
    assert np.bincount(data.train_y[balanced]).tolist() == [2, 2, 2, 2]
    assert set(memory.exemplars[0][:2]) <= set(balanced) and np.array_equal(memory.indices(), before)


def test_class_means_are_normalised_means_of_normalised_exemplar_features():
    data = _FakeData()
    memory = ExemplarMemory(0, True, 3, "random", n_classes=4, seed=0)
    memory.update([0, 1], 2, data, _features)
    means = memory.class_means(data, _features)
    assert means.shape == (2, 2)
    for c in (0, 1):
        expected = F.normalize(_unit(memory.exemplars[c]).mean(0), dim=0)
        torch.testing.assert_close(means[c], expected)


def test_random_selection_depends_on_the_seed_and_the_class():
    data = _FakeData()
    picks = {}
    for seed in (5, 6):
        memory = ExemplarMemory(0, True, 3, "random", n_classes=4, seed=seed)
        memory.update([0, 1], 2, data, _features)
        picks[seed] = {c: (v - 10 * c).tolist() for c, v in memory.exemplars.items()}
    assert picks[5] != picks[6] and picks[5][0] != picks[5][1]


def test_exemplars_and_class_means_use_the_features_of_the_un_augmented_images(monkeypatch):
    """iCaRL's end of task on digits whose train augmentation flips every image (digits have none of their own, so
    one that certainly changes each image stands in): the features the memory selects from are those of the
    un-augmented images, not of the flipped ones, and so are the NME class means (the normalised mean of the
    normalised features of each class's exemplars)."""
    from torchvision import transforms as T

    from datasets.digits import Digits
    from method_builders import build, start
    from trainer.engine.engine import Engine

    monkeypatch.setattr(Digits, "train_augment", lambda self: [T.RandomHorizontalFlip(p=1.0)])
    method = build("icarl", "--memory_size", "20", "--apply_nme", "true")
    task = start(method, 0)
    data = method.data
    pool = data.indices("train", task.classes)
    views = {augment: data.dataset("train", pool, augment=augment) for augment in (False, True)}
    x = {augment: torch.stack([view[i][0] for i in range(len(view))]) for augment, view in views.items()}
    assert float((x[True] - x[False]).abs().amax((1, 2, 3)).min()) > 0.1  # the augmentation changes every image
    with torch.no_grad():
        method.eval()
        features = {augment: F.normalize(method.network.features(v).double(), dim=1) for augment, v in x.items()}

    used = {}
    update = method.memory.update

    def recording(classes, n_seen, data, features_of):
        used["features"] = F.normalize(features_of(pool).double(), dim=1)
        return update(classes, n_seen, data, features_of)

    monkeypatch.setattr(method.memory, "update", recording)
    method.end_task(task, Engine(torch.device("cpu"), amp=False).infer)
    assert float((features[True] - features[False]).norm(dim=1).min()) > 1e-2  # flipped digits: other features
    torch.testing.assert_close(used["features"], features[False], rtol=0, atol=1e-5)
    for c in task.classes:
        exemplars = method.memory.exemplars[c]
        assert len(exemplars) == 10
        rows = torch.as_tensor(np.searchsorted(pool, exemplars))
        expected = F.normalize(features[False][rows].mean(0), dim=0)
        torch.testing.assert_close(method.class_means[c].double(), expected, rtol=0, atol=1e-5)
