"""Hostile structured files (issue 28): every reader of a user-supplied pickle, YAML or JSON file is bounded in time
and memory. A tiny file that expands (a pickled DAG, a YAML alias bomb), nests thousands of levels deep, holds a
5 MB value or asks numpy for memory it does not bring ends in one short line naming the file, within a second or
two; nothing hangs, crashes or prints a traceback. The runs are the tiny digits runs of test_robustness."""
import json
import os
import pickle
import subprocess
import sys
import time

import numpy as np
import pytest

from conftest import ROOT
from dataset_fixtures import FIXTURES
from datasets import check as dataset_check
from test_robustness import DIGITS, TINY, copy_run, fails, finished, no_plots  # noqa: F401 - fixtures
from trainer import summarize
from utils import safe_pickle
from utils.registry import UserError, shorten


def dag(levels: int) -> list:
    """A list holding two references to the list below it: pickled in a few hundred bytes (pickle stores a
    shared object once), 2**levels items when walked as a tree."""
    node = [0]
    for _ in range(levels):
        node = [node, node]
    return node


def alias_bomb(levels: int = 9, width: int = 10) -> str:
    """YAML of a few hundred bytes whose aliases expand to width**levels values."""
    rows = [f"&a0 [{', '.join(['x'] * width)}]"]
    rows += [f"&a{i} [{', '.join([f'*a{i - 1}'] * width)}]" for i in range(1, levels)]
    return f"[{', '.join(rows)}]"


def timed_fail(argv, capsys, root=None) -> str:
    """`fails`, within 2 s, with a line short enough to read."""
    start = time.perf_counter()
    line = fails(argv, capsys, root)
    assert time.perf_counter() - start < 2, argv[:4]
    assert len(line) < 300, line[:400]
    return line


def refused(data: bytes, *words: str) -> str:
    start = time.perf_counter()
    with pytest.raises(UserError) as err:
        safe_pickle.loads(data, "f.pkl")
    assert time.perf_counter() - start < 2
    message = str(err.value)
    assert "f.pkl" in message and "\n" not in message and all(w in message for w in words), message
    return message


# ---- pickles ------------------------------------------------------------------------------------------------------

def test_a_pickled_dag_is_refused_within_a_second():
    data = pickle.dumps({b"data": np.zeros((2, 3072), np.uint8), b"fine_labels": dag(40)}, protocol=2)
    assert len(data) < 8000
    refused(data, "refused", "10,000,000 items")
    shared = pickle.dumps([b"x" * 2**20] * 200_000, protocol=4)  # 1 MB of data, 200,000 times: 200 GB as a tree
    refused(shared, "refused", "bytes of data")
    assert safe_pickle.loads(pickle.dumps(dag(10))) == dag(10)  # a small DAG is plain data


NESTED = {"lists": b"]" * 100_000 + b"a" * 99_999, "tuples": b"(" * 100_000 + b"t" * 99_999,
          "dicts": b"}" + b"K\x00}" * 100_000 + b"s" * 100_000}  # {0: {0: ...}}: each set into the one before


@pytest.mark.parametrize("kind", NESTED)
def test_deep_nesting_in_a_pickle_is_one_line(kind):
    """100,000 nested lists, tuples or dicts built by opcodes: no RecursionError, refused in one line."""
    refused(b"\x80\x04" + NESTED[kind] + b".", "nesting deeper than 100 levels")


def test_a_reference_cycle_and_container_dict_keys_and_sets_are_refused():
    cycle = []
    cycle.append(cycle)
    refused(pickle.dumps(cycle), "reference cycle")
    key = (0,)
    for _ in range(3):
        key = (key, key)
    refused(pickle.dumps({key: 1}, protocol=4), "dict key")  # hashing a crafted tuple takes 2**depth steps
    refused(pickle.dumps({b"s": {1, 2}}, protocol=4), "set")


class _Numpy:
    """Pickles as a call of numpy's own reconstructors with the arguments given (what a crafted file can say)."""

    def __init__(self, func, args, state=None):
        self.reduced = (func, args) if state is None else (func, args, state)

    def __reduce__(self):
        return self.reduced


@pytest.mark.parametrize("crafted, words", [
    (_Numpy(np.ndarray, ((10**7,), np.dtype("u1"))), "numpy.ndarray directly"),
    (_Numpy(safe_pickle._multiarray._reconstruct, (np.ndarray, (10**7,), b"b")), "before its data"),
    (_Numpy(safe_pickle._multiarray._reconstruct, (np.ndarray, (0,), b"b"),
            (1, (10**7,), np.dtype("u1"), False, b"ab")), "2 bytes of data"),
    (_Numpy(safe_pickle._multiarray._reconstruct, (np.ndarray, (0,), b"b"),
            (1, (3,), np.dtype("O"), False, [1, 2, 3])), "dtype object"),
    (_Numpy(safe_pickle._numeric._frombuffer, (b"ab", np.dtype("u1"), (10**7,), "C")), "2 bytes of data"),
    (_Numpy(safe_pickle._multiarray.scalar, (np.dtype("i8"), b"ab")), "2 bytes of data"),
])
def test_numpy_is_never_asked_for_memory_the_file_does_not_bring(crafted, words):
    """An array of any shape from a few bytes (numpy would allocate it, or read past the data) is refused before
    numpy is called."""
    refused(pickle.dumps(crafted, protocol=2), "refused", words)


def test_a_crafted_dtype_state_or_an_object_array_never_reaches_numpy():
    """numpy's __setstate__ trusts its input: an object array given a short list crashes the process (it did,
    with a 200-byte file), and a dtype state can mark uint8 as holding objects. Run in a child process, so that a
    crash fails this test instead of ending the test session."""
    code = """if True:
        import pickle
        import numpy as np
        from utils import safe_pickle
        from utils.registry import UserError
        rec = safe_pickle._multiarray._reconstruct
        class Array:
            def __init__(self, state):
                self.state = state
            def __reduce__(self):
                return rec, (np.ndarray, (0,), b"b"), self.state
        class Flagged:  # uint8 whose state says it holds objects (flags 63)
            def __reduce__(self):
                return np.dtype, ("u1", False, True), (3, "|", None, None, None, -1, -1, 63)
        try:
            safe_pickle.loads(pickle.dumps(Array((1, (1000,), np.dtype("O"), False, [1, 2])), 2), "f.pkl")
            print("accepted")
        except UserError as err:
            print(err)
        back = safe_pickle.loads(pickle.dumps(Array((1, (2,), Flagged(), False, b"ab")), 2), "f.pkl")
        print(back.dtype, back.dtype.hasobject, back.tolist())
    """
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr[-2000:]
    lines = out.stdout.splitlines()
    assert len(lines) == 2 and "f.pkl' is refused" in lines[0] and "dtype object" in lines[0], lines
    assert lines[1] == "uint8 False [97, 98]", lines  # the flags never reached numpy


@pytest.mark.parametrize("protocol", [2, 3, 4, 5])
def test_the_arrays_and_scalars_numpy_writes_still_load(protocol):
    data = {b"u1": np.arange(6, dtype=np.uint8).reshape(2, 3), "f4": np.linspace(0, 1, 5, dtype="<f4"),
            "i8": np.arange(3, dtype=">i8"), "U": np.array(["ab", "c"]), "S": np.array([b"ab", b"c"]),
            "b": np.array([True, False]), "c": np.array([1 + 2j]), "F": np.asfortranarray(np.ones((2, 3))),
            "scalars": [np.int64(3), np.float32(1.5), np.str_("x"), np.bool_(1)],
            "nested": {"t": (1, 2.5, None, "s", b"b"), "shared": [dag(3), dag(3)]}}
    if protocol > 2:  # protocol 2 writes b'' as a call of bytes(), which is not on the list
        data["empty"] = np.zeros((0, 3), np.int16)
    back, plain = safe_pickle.loads(pickle.dumps(data, protocol=protocol)), pickle.loads(pickle.dumps(data, protocol))
    for key, value in data.items():
        if isinstance(value, np.ndarray):
            assert back[key].dtype == plain[key].dtype and np.array_equal(back[key], value), key
    assert back["scalars"] == data["scalars"] and back["nested"] == data["nested"]
    assert back["F"].flags.f_contiguous and back["i8"].tolist() == [0, 1, 2]


def _dag_cifar(tmp_path):
    FIXTURES["cifar100"](str(tmp_path / "data"))
    train = tmp_path / "data" / "cifar-100-python" / "train"
    with open(train, "wb") as f:
        pickle.dump({b"data": np.zeros((2, 3072), np.uint8), b"fine_labels": dag(40)}, f, protocol=2)
    return train


def test_a_cifar_batch_holding_a_dag_is_one_line_not_a_hang(tmp_path, capsys):
    train = _dag_cifar(tmp_path)
    assert os.path.getsize(train) < 8000
    start = time.perf_counter()
    assert dataset_check.main(["cifar100", "--data_root", str(tmp_path / "data")]) != 0
    assert time.perf_counter() - start < 2
    out = capsys.readouterr()
    assert f"'{train}' is refused" in out.out + out.err and "items" in out.out + out.err
    line = timed_fail(["--method", "finetune_il", "--dataset", "cifar100", "--backbone", "resnet32", "--data_root",
                       str(tmp_path / "data"), *TINY], capsys, tmp_path / "logs")
    assert str(train) in line and "refused" in line
    assert not os.path.exists(tmp_path / "logs")


# ---- YAML and JSON ------------------------------------------------------------------------------------------------

def _config(tmp_path, line: str, name="config.yaml") -> str:
    """DIGITS with one more line under basic:."""
    text = open(DIGITS).read().replace("basic:\n", f"basic:\n{line}\n", 1)
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def test_an_alias_bomb_in_a_config_is_refused_naming_file_and_line(tmp_path, capsys):
    path = _config(tmp_path, f"  note: {alias_bomb()}")
    assert os.path.getsize(path) < 2000
    line = timed_fail(["--config", path, *TINY], capsys, tmp_path / "logs")
    assert path in line and "line 5" in line and "aliases expand it to more than 10,000 values" in line
    recursive = _config(tmp_path, "  seed: &s [1, *s]", "recursive.yaml")
    assert "alias inside the value it names" in timed_fail(["--config", recursive, *TINY], capsys, tmp_path / "logs")
    assert not os.path.exists(tmp_path / "logs")


def test_anchors_and_merge_keys_of_the_options_files_still_load(tmp_path, capsys):
    from methods import method_config
    from trainer.config_loader import load_config
    cfg = load_config(os.path.join(ROOT, "options", "acl", "skin8.yaml"), {}, method_config)
    assert cfg.method == "acl"
    shared = _config(tmp_path, "  milestones: &m [2, 3]\n  init_milestones: *m")
    assert load_config(shared, {}, method_config).init_milestones == [2, 3]


@pytest.mark.parametrize("value, words", [("[" * 5000 + "]" * 5000, "nesting deeper than 32 levels"),
                                          ("\n" + "".join(f"{'  ' * (i + 2)}- \n" for i in range(60)) + "  " * 62
                                           + "- x", "nesting deeper than 32 levels")], ids=["flow", "block"])
def test_deep_nesting_in_a_config_is_one_line(value, words, tmp_path, capsys):
    path = _config(tmp_path, f"  seed: {value}")
    line = timed_fail(["--config", path, *TINY], capsys, tmp_path / "logs")
    assert path in line and words in line


RUN_FILES = {  # what is done to a finished run's file -> what the one line says
    "config.yaml alias bomb": ("config.yaml",
                               lambda text: text.replace("basic:\n", f"basic:\n  note: {alias_bomb()}\n"),
                               "aliases expand it"),
    "config.yaml deep": ("config.yaml", lambda text: text.replace("basic:\n", "basic:\n  note: " + "[" * 5000
                                                                  + "]" * 5000 + "\n"), "nesting deeper than 32"),
    "results.json deep": ("results.json", lambda text: text[:-1] + ', "x": ' + "[" * 5000 + "]" * 5000 + "}",
                          "nested deeper than 32 levels"),
    "results.json 40 deep": ("results.json", lambda text: text[:-1] + ', "x": ' + "[" * 40 + "]" * 40 + "}",
                             "nested deeper than 32 levels"),
    "results.json cut": ("results.json", lambda text: text[:100], "not JSON"),
}


@pytest.mark.parametrize("case", RUN_FILES)
def test_a_run_folder_with_a_hostile_config_yaml_or_results_json(case, finished, tmp_path, capsys):
    """config.yaml and results.json of a finished run, re-tested with --checkpoint_dir: a bomb or deep nesting in
    either is one line naming it."""
    name, change, words = RUN_FILES[case]
    run_dir = copy_run(finished, tmp_path)
    path = os.path.join(run_dir, name)
    with open(path) as f:
        text = f.read()
    with open(path, "w") as f:
        f.write(change(text))
    line = timed_fail(["--checkpoint_dir", run_dir, "--device", "cpu"], capsys)
    assert path in line and words in line, line


def test_a_long_value_is_refused_or_quoted_short(tmp_path, capsys):
    """A 5 MB value in a config or on the command line, and long values under the limits: one short line."""
    big = _config(tmp_path, "  note: " + "a" * 5_000_000, "big.yaml")
    line = timed_fail(["--config", big, *TINY], capsys, tmp_path / "logs")
    assert big in line and "larger than 32 KiB" in line
    long = _config(tmp_path, "  note: " + "a" * 10_000, "long.yaml")
    line = timed_fail(["--config", long, *TINY], capsys, tmp_path / "logs")
    assert long in line and "line 5" in line and "10,000 characters" in line
    line = timed_fail(["--config", DIGITS, *TINY, "--note", "a" * 5_000_000], capsys, tmp_path / "logs")
    assert "--note" in line and "5,000,000 characters" in line
    line = timed_fail(["--config", DIGITS, *TINY, "--note", "a" * 4000], capsys, tmp_path / "logs")
    assert "note 'aaaa" in line and "(4,000 characters)" in line and "longer than 200 bytes" in line
    for key, value in (("init_lrate", "x" * 4000), ("class_order_seed", "9" * 4000), ("note", "0x" + "f" * 4000),
                       ("init_lrate", "0x" + "f" * 4000), ("normalize", "y" * 4000)):  # keys DIGITS leaves out
        in_file = _config(tmp_path, f"  {key}: {value}", f"{key}.yaml")
        assert in_file in timed_fail(["--config", in_file, *TINY], capsys, tmp_path / "logs")
        assert f"'{key}'" in timed_fail(["--config", DIGITS, *TINY, f"--{key}", value], capsys, tmp_path / "logs")
    assert not os.path.exists(tmp_path / "logs")


def test_an_alias_bomb_or_deep_nesting_on_the_command_line(tmp_path, capsys):
    line = timed_fail(["--config", DIGITS, *TINY, "--note", alias_bomb()], capsys, tmp_path)
    assert "--note" in line and "aliases expand it" in line
    assert "'seed'" in timed_fail(["--config", DIGITS, *TINY, "--seed", "[" * 2000 + "]" * 2000], capsys, tmp_path)
    assert os.listdir(tmp_path) == []


def test_shorten_formats_only_what_it_shows():
    start = time.perf_counter()
    assert shorten("a" * 5_000_000) == repr("a" * 80) + "… (5,000,000 characters)"
    assert shorten(dag(40)).startswith("[[[[") and len(shorten(dag(40))) < 100
    assert shorten(10**5000) == "<an integer of 16,610 bits>" and shorten("x\ny") == "'x\\ny'"
    assert shorten(list(range(1000))).endswith("(1,000 items)") and shorten(1.5) == "1.5"
    assert time.perf_counter() - start < 1


# ---- summarize ----------------------------------------------------------------------------------------------------

def test_summarize_leaves_out_corrupt_results_with_a_warning(finished, tmp_path, capsys):
    copy_run(finished, tmp_path, "good")
    corrupt = {"notjson": "{not json", "deep": "[" * 5000 + "]" * 5000, "list": "[1, 2]",
               "shape": json.dumps(dict(finished[1], config={"method": ["x"], "dataset": "d", "backbone": "b"})),
               "badstat": json.dumps(dict(finished[1], summary={"last_acc": {"mean": "x"}}))}
    for name, text in corrupt.items():
        os.makedirs(tmp_path / name)
        (tmp_path / name / "results.json").write_text(text)
    os.makedirs(tmp_path / "folder" / "results.json")  # a folder of that name is no file
    os.symlink(".", tmp_path / "loop1")  # two links back: a plain recursive glob visits 2**depth paths
    os.symlink(".", tmp_path / "loop2")
    start = time.perf_counter()
    rows = summarize.main([str(tmp_path)])
    assert time.perf_counter() - start < 2
    out = capsys.readouterr()
    assert len(rows) == 1 and rows[0]["method"] == "finetune_il" and "finetune_il" in out.out
    warnings = out.err.strip().splitlines()
    assert len(warnings) == len(corrupt) and all(w.startswith("warning: left out '") for w in warnings), warnings
    for name in corrupt:
        assert sum(str(tmp_path / name / "results.json") in w for w in warnings) == 1, name
    assert "nested too deeply" in "".join(warnings) and "not JSON" in "".join(warnings)


def test_summarize_with_nothing_usable_or_a_folder_for_csv_is_one_error_line(finished, tmp_path, capsys):
    (tmp_path / "results.json").write_text("[" * 5000)
    with pytest.raises(SystemExit) as code:
        summarize.main([str(tmp_path)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code.value.code == 2 and len(err) == 1 and err[0].startswith("error: ") and str(tmp_path) in err[0]
    copy_run(finished, tmp_path, "good")
    for target, words in ((tmp_path, "is a folder"), (tmp_path / "missing" / "table.csv", "cannot be written")):
        with pytest.raises(SystemExit) as code:
            summarize.main([str(tmp_path), "--csv", str(target)])
        out = capsys.readouterr()
        err = out.err.strip().splitlines()
        assert code.value.code == 2 and err[-1].startswith(f"error: --csv '{target}' {words}"), err
    assert out.out  # the table is printed before a CSV file that cannot be written; a folder is refused first
