"""Every registered dataset loads a tiny fake in its real format and trains through main.py; malformed folders
give the one-line UserError; `python -m datasets.check` reports counts and unreadable files."""
import glob
import math
import os

import numpy as np
import pytest
import torch
import yaml

from conftest import ROOT
from dataset_fixtures import BUNDLED, FIXTURES, MEDMNIST_FLAGS, image, medmnist_npz, write_lines
from datasets import DATASETS
from datasets import check as dataset_check
from datasets.base import Pool, PoolView
from datasets.skin8 import Skin8
from utils.registry import UserError

#: MedMNIST subsets trained through main.py (all of them are loaded): multi-label, binary, no-flip, RGB
MEDMNIST_RUN = ("chestmnist", "pneumoniamnist", "organamnist", "pathmnist")


def load(name, root):
    spec = DATASETS.get(name)()
    return spec, spec.load(str(root))


@pytest.mark.parametrize("name", DATASETS.keys())
def test_loader_reads_its_fixture(name, tmp_path):
    assert name in FIXTURES, f"tests/dataset_fixtures.py has no fixture generator for dataset '{name}'"
    n_train, n_test = FIXTURES[name](str(tmp_path))
    spec, data = load(name, tmp_path)
    n = spec.n_classes
    assert (len(data.train_x), len(data.train_y), len(data.test_x), len(data.test_y)) == (n_train, n_train, n_test,
                                                                                          n_test)
    assert data.train_y.dtype == data.test_y.dtype == np.int64
    assert sorted(set(data.train_y.tolist())) == list(range(n)) and set(data.test_y.tolist()) <= set(range(n))
    assert data.class_names is None or len(data.class_names) == n
    assert spec.task_groups is None or sum(spec.task_groups) == n
    if spec.use_path:
        assert all(os.path.isfile(p) for p in data.train_x[:5])
    else:
        assert data.train_x.dtype == np.uint8 and data.train_x.ndim == 4 and data.train_x.shape[-1] == 3
    for train, x, y in ((True, data.train_x, data.train_y), (False, data.test_x, data.test_y)):
        for batched in (True, False):  # in-memory pools: whole batches on the device, or per-sample PIL
            view = PoolView(Pool(spec, x[:2], y[:2], 16, batched), np.arange(2), train)
            image_tensor, label = view[0]
            batch, labels = view.batch(torch.arange(2), torch.device("cpu"))
            assert image_tensor.shape == (3, 16, 16) and torch.isfinite(image_tensor).all() and label == y[0]
            assert batch.shape == (2, 3, 16, 16) and torch.isfinite(batch).all() and labels.tolist() == y[:2].tolist()


def run_names():
    """Every dataset but the bundled ones (no files; tests/test_methods.py trains on digits, and mnist5k's 4000
    training images would take most of a minute; its loader is tests/test_mnist5k.py's, its in-memory path
    digits'), most MedMNIST subsets (one loader serves them all) and imagenet1000 (its fixture has 1000 classes;
    its folder layout and transforms are imagenet100's and tinyimagenet's, which do run, and
    test_loader_reads_its_fixture reads it)."""
    return [n for n in DATASETS.keys() if n not in (*BUNDLED, "imagenet1000")
            and (n not in MEDMNIST_FLAGS or n in MEDMNIST_RUN)]


@pytest.mark.parametrize("name", run_names())
def test_finetune_one_epoch_through_main(name, tmp_path, run_main):
    FIXTURES[name](str(tmp_path / "data"))
    spec = DATASETS.get(name)
    half = math.ceil(spec.n_classes / 2)
    memory = "10" if spec.n_classes <= 40 else "0"  # replay (file paths too) where herding is cheap
    results, _ = run_main("--method", "finetune_il", "--dataset", name, "--data_root", str(tmp_path / "data"),
                          "--backbone", "resnet32", "--img_size", "16", "--device", "cpu", "--seed", "1",
                          "--epochs", "1", "--batch_size", "32", "--memory_size", memory,
                          "--init_cls", str(half), "--increment", str(half))
    tasks = results["runs"][0]["tasks"]
    assert len(tasks) == (len(spec.task_groups) if spec.task_groups else 2)
    assert tasks[-1]["classes"][1] == spec.n_classes
    assert all(0.0 <= t["acc"] <= 100.0 for t in tasks)


def one_line_error(fn):
    with pytest.raises(UserError) as err:
        fn()
    assert "\n" not in str(err.value) and "expected" in str(err.value)
    return str(err.value)


def test_missing_folder_is_one_line_error_with_layout(tmp_path):
    for name in DATASETS.keys():
        if name not in BUNDLED:
            message = one_line_error(lambda: load(name, tmp_path))
            assert str(tmp_path) in message, message


def test_missing_class_folder(tmp_path):
    FIXTURES["tinyimagenet"](str(tmp_path))
    os.rename(os.path.join(tmp_path, "tiny-imagenet-200", "train", "n00000007"), os.path.join(tmp_path, "moved"))
    assert "199 class folders, expected 200" in one_line_error(lambda: load("tinyimagenet", tmp_path))


def test_test_split_with_other_classes_than_train(tmp_path):
    FIXTURES["path16"](str(tmp_path))
    lung = os.path.join(tmp_path, "Pathology16", "lung", "test")
    os.rename(os.path.join(lung, "type_z"), os.path.join(lung, "type_x"))
    assert "different class folders" in one_line_error(lambda: load("path16", tmp_path))


def skin23_through_main(root):
    import main

    argv = ["--method", "finetune_il", "--dataset", "skin23", "--data_root", str(root), "--backbone", "resnet32",
            "--device", "cpu", "--img_size", "16", "--init_cls", "23", "--log_root", str(root / "logs")]
    with pytest.raises(UserError) as err:
        main.main(argv)
    assert "\n" not in str(err.value)
    return str(err.value)


def test_missing_class_through_main_is_user_error(tmp_path):
    FIXTURES["skin23"](str(tmp_path))
    os.rename(os.path.join(tmp_path, "skin23", "train", "Disease 03"), os.path.join(tmp_path, "moved"))
    assert "22 class folders, expected 23" in skin23_through_main(tmp_path)


def test_unreadable_image_through_main_is_user_error(tmp_path):
    FIXTURES["skin23"](str(tmp_path))
    broken = os.path.join(tmp_path, "skin23", "train", "Disease 07", "Disease 07_1.jpg")
    with open(broken, "wb") as f:
        f.write(b"\xff\xd8 truncated")
    message = skin23_through_main(tmp_path)
    assert "cannot read image" in message and broken in message


@pytest.mark.parametrize("name, edit", [
    ("imagenet100", lambda root: write_lines(os.path.join(root, "miniImageNet", "val.txt"),
                                             ["/val/n00000001/n00000001_0.JPEG 100"])),
    ("skin40", lambda root: write_lines(os.path.join(root, "SD-198", "main_classes_split", "val_1.txt"),
                                        ["Class_00/img_2.jpg -1"])),
    ("cub200", lambda root: write_lines(os.path.join(root, "CUB_200_2011", "image_class_labels.txt"),
                                        [f"{i} {201 if i == 5 else 1}" for i in range(1, 601)])),
    ("pathmnist", lambda root: medmnist_npz(os.path.join(root, "medmnist", "pathmnist.npz"), 10, 3)),
])
def test_label_out_of_range(name, edit, tmp_path):
    FIXTURES[name](str(tmp_path))
    edit(str(tmp_path))
    assert "outside [0," in one_line_error(lambda: load(name, tmp_path))


def test_listed_image_missing_and_malformed_list(tmp_path):
    FIXTURES["imagenet100"](str(tmp_path))
    os.remove(os.path.join(tmp_path, "miniImageNet", "train", "n00000003", "n00000003_1.JPEG"))
    assert "1 image(s) listed" in one_line_error(lambda: load("imagenet100", tmp_path))
    write_lines(os.path.join(tmp_path, "miniImageNet", "train.txt"), ["just-a-path.JPEG"])
    assert "line 1" in one_line_error(lambda: load("imagenet100", tmp_path))


def test_check_reports_counts_and_unreadable_images(tmp_path):
    FIXTURES["skin23"](str(tmp_path))
    report = dataset_check.check("skin23", str(tmp_path), workers=2)
    assert report.ok and report.counts["train"].tolist() == [2] * 23 and report.counts["test"].tolist() == [1] * 23
    assert dataset_check.main(["skin23", "--data_root", str(tmp_path)]) == 0
    broken = os.path.join(tmp_path, "skin23", "test", "Disease 05", "Disease 05_0.jpg")
    with open(broken, "wb") as f:
        f.write(b"not a jpeg")
    report = dataset_check.check("skin23", str(tmp_path), workers=2)
    assert len(report.problems) == 1 and broken in report.problems[0]
    assert dataset_check.main(["skin23", "--data_root", str(tmp_path)]) == 1
    assert not dataset_check.check("skin23", str(tmp_path / "elsewhere")).ok


def test_check_module_registers_nothing():
    before = DATASETS.keys()
    import importlib

    importlib.reload(dataset_check)
    assert DATASETS.keys() == before


def test_imagenet_r_split_is_fixed_and_stable(tmp_path):
    FIXTURES["imagenet_r"](str(tmp_path))
    np.random.seed(0)
    _, first = load("imagenet_r", tmp_path)
    np.random.seed(1)
    _, again = load("imagenet_r", tmp_path)
    assert first.test_x.tolist() == again.test_x.tolist()
    assert np.bincount(first.test_y).tolist() == [1] * 200  # 20% of 3 images per class, at least one
    removed = [p for p in first.train_x if "n00000009" in p][0]
    os.remove(removed)
    _, fewer = load("imagenet_r", tmp_path)
    assert fewer.test_x.tolist() == first.test_x.tolist()
    assert set(fewer.train_x.tolist()) == set(first.train_x.tolist()) - {removed}


def test_imagenet_r_prefers_a_user_split(tmp_path):
    from dataset_fixtures import class_tree, wnids

    for split, count in (("train", 2), ("test", 1)):
        class_tree(os.path.join(tmp_path, "imagenet_r", split), wnids(200), count, ".jpg")
    _, data = load("imagenet_r", tmp_path)
    assert (len(data.train_y), len(data.test_y)) == (400, 200)


def test_skin8_list_files_in_the_original_format(tmp_path):
    base = os.path.join(tmp_path, "ISIC2019")
    lines = {"train": [], "test": []}
    for label, cls in enumerate(Skin8.class_names):
        for i, split in enumerate(("train", "train", "test")):
            rel = f"Data/{cls}/ISIC_{label}{i:06d}.jpg"
            image(os.path.join(base, rel), label, i)
            lines[split].append(f"{rel} {label}")
    for split, entries in lines.items():
        write_lines(os.path.join(tmp_path, f"my_{split}.txt"), entries)
    data = Skin8(str(tmp_path / "my_train.txt"), str(tmp_path / "my_test.txt")).load(str(tmp_path))
    assert np.bincount(data.train_y).tolist() == [2] * 8 and np.bincount(data.test_y).tolist() == [1] * 8
    assert "give both" in one_line_error(lambda: Skin8(str(tmp_path / "my_train.txt")).load(str(tmp_path)))
    report = dataset_check.check("skin8", str(tmp_path), train_list=str(tmp_path / "my_train.txt"),
                                 test_list=str(tmp_path / "my_test.txt"))
    assert report.ok and report.counts["test"].tolist() == [1] * 8
    with pytest.raises(UserError, match="takes no train_list"):
        dataset_check.check("skin7", str(tmp_path), train_list="x.txt")
    for split, original in (("train", "skin8_train_500.txt"), ("test", "skin8_test_500.txt")):
        os.rename(tmp_path / f"my_{split}.txt", os.path.join(base, original))
    _, found = load("skin8", tmp_path)  # the original's list files in the dataset folder are used by default
    assert found.train_x.tolist() == data.train_x.tolist()


def test_skin8_ground_truth_split_uses_the_original_counts(tmp_path):
    """With every class present in full the split has the original's counts; DF and VASC use all images."""
    from datasets.skin8 import COUNTS

    base = os.path.join(tmp_path, "ISIC2019")
    header = ["image", "MEL", "NV", "BCC", "AK", "BKL", "DF", "VASC", "SCC", "UNK"]
    rows = [",".join(header)]
    os.makedirs(os.path.join(base, "ISIC_2019_Training_Input"))
    for cls, (n_train, n_test) in COUNTS.items():
        for i in range(n_train + n_test + (30 if cls not in ("DF", "VASC") else 0)):
            name = f"ISIC_{cls}_{i:05d}"
            open(os.path.join(base, "ISIC_2019_Training_Input", name + ".jpg"), "wb").close()
            rows.append(",".join([name] + ["1.0" if h == cls else "0.0" for h in header[1:]]))
    write_lines(os.path.join(base, "ISIC_2019_Training_GroundTruth.csv"), rows)
    _, data = load("skin8", tmp_path)
    assert np.bincount(data.train_y).tolist() == [c[0] for c in COUNTS.values()]
    assert np.bincount(data.test_y).tolist() == [c[1] for c in COUNTS.values()]
    _, again = load("skin8", tmp_path)
    assert again.test_x.tolist() == data.test_x.tolist()


def test_medmnist_any_size_and_v1_name(tmp_path):
    medmnist_npz(os.path.join(tmp_path, "medmnist", "dermamnist_64.npz"), 7, 3, size=64)
    spec, data = load("dermamnist", tmp_path)
    assert data.train_x.shape[1:] == (64, 64, 3) and spec.img_size == 64
    x, _ = PoolView(Pool(spec, data.train_x[:1], data.train_y[:1], 32, True), np.arange(1), True)[0]
    assert x.shape == (3, 32, 32)
    FIXTURES["mymedmnist"](str(tmp_path))
    os.rename(os.path.join(tmp_path, "medmnist", "organmnist_axial.npz"),
              os.path.join(tmp_path, "medmnist", "organamnist.npz"))
    spec, data = load("mymedmnist", tmp_path)
    assert spec.task_groups == [8, 11, 9, 8] and data.train_x.shape[1:] == (28, 28, 3)
    medmnist_npz(os.path.join(tmp_path, "medmnist", "organamnist_64.npz"), 11, 1, size=64)
    os.remove(os.path.join(tmp_path, "medmnist", "organamnist.npz"))
    assert "one size" in one_line_error(lambda: load("mymedmnist", tmp_path))


def test_mymedmnist_shuffles_whole_subsets_by_seed(tmp_path):
    from trainer.config_loader import load_config
    from datasets.scenario import DataManager
    from methods import method_config

    FIXTURES["mymedmnist"](str(tmp_path))
    cfg = load_config(None, {"method": "finetune_il", "dataset": "mymedmnist", "backbone": "resnet32",
                             "data_root": str(tmp_path), "shuffle": True}, method_config)
    sizes = {seed: [t.total - t.known for t in DataManager(cfg, seed).tasks] for seed in range(6)}
    assert all(sorted(s) == [8, 8, 9, 11] for s in sizes.values()) and len({tuple(s) for s in sizes.values()}) > 1


@pytest.mark.parametrize("method", ["finetune_il", "finetune_normal"])
def test_shipped_configs_name_registered_datasets(method):
    paths = sorted(glob.glob(os.path.join(ROOT, "options", method, "*.yaml")))
    for path in paths:
        with open(path) as f:
            config = yaml.safe_load(f)
        dataset = config["basic"]["dataset"]
        name = os.path.basename(path)[:-5]  # <dataset>.yaml, or <dataset>_<variant>.yaml (digits_pretrained)
        assert dataset in DATASETS and (name == dataset or name.startswith(dataset + "_")), path
        assert set(config["options"]) == {dataset}, path
    names = {os.path.basename(p)[:-5].split("_pretrained")[0] for p in paths}
    assert {"cifar100", "skin8", "skin40", "path16", "mymedmnist", "imagenet_r", "cifar10", "imagenet100",
            "imagenet1000", "cub200"} <= names
