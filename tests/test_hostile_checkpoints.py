"""Checkpoints that are not what they claim (issue 28): a pickle the weights-only loader refuses stops a resume
(it is never taken for a damaged file and skipped), and a re-test that finds other weights, or other numbers,
behind an unchanged config says so (`--strict`: refuses). Runs are two digits tasks of one epoch at 8 px."""
import json
import os
import zipfile

import pytest
import torch

import main
from test_robustness import ckpt, copy_run, fails, files, finished, no_plots, rewound  # noqa: F401 - fixtures
from trainer import checkpoint


def _with_pickle(path: str, data_pkl: bytes) -> None:
    """Rewrite the checkpoint at `path` with its data.pkl replaced: an intact zip archive whose pickle is other."""
    with zipfile.ZipFile(path) as z:
        members = {name: z.read(name) for name in z.namelist()}
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as z:
        for name, data in members.items():
            z.writestr(name, data_pkl if name.endswith("/data.pkl") else data)


REFUSED_PICKLES = {
    "extension-registry opcode": b"\x80\x02\x82\x01.",  # EXT1: calls copyreg's registry
    "INST opcode": b"(ios\nsystem\n.",  # an old-style instance of os.system
    "bytes that are no pickle": b"garbage",
}


@pytest.mark.parametrize("case", REFUSED_PICKLES)
def test_a_pickle_the_weights_only_loader_refuses_stops_the_resume(case, finished, tmp_path, capsys):
    """An unfinished run whose latest.pt is refused must not fall back to the task-0 checkpoint and go on."""
    run_dir = rewound(finished, tmp_path)
    _with_pickle(ckpt(run_dir, "seed1_latest.pt"), REFUSED_PICKLES[case])
    before = files(run_dir)
    line = fails(["--checkpoint_dir", run_dir], capsys)
    assert "refused" in line and ckpt(run_dir, "seed1_latest.pt") in line
    assert files(run_dir) == before


def test_a_truncated_checkpoint_is_unreadable_not_refused(tmp_path):
    """The other side of the line: a file cut short (no zip directory, or the pickle cut short) may be skipped."""
    path = str(tmp_path / "c.pt")
    torch.save({"a": torch.zeros(3)}, path)
    raw = open(path, "rb").read()
    with open(path, "wb") as f:
        f.write(raw[: len(raw) // 2])
    with pytest.raises(checkpoint.UnreadableCheckpoint):
        checkpoint.load(path)
    torch.save({"a": torch.zeros(3)}, path)
    with zipfile.ZipFile(path) as z:
        pkl = next(z.read(n) for n in z.namelist() if n.endswith("/data.pkl"))
    _with_pickle(path, pkl[:10])
    with pytest.raises(checkpoint.UnreadableCheckpoint):
        checkpoint.load(path)


def test_digest_tells_any_change_of_the_weights_or_extra_state():
    state = {"w": torch.arange(6, dtype=torch.float32).view(2, 3), "b": torch.ones(2), "n": torch.tensor(3)}
    extra = {"lambda": [0.5, 1.0], "counts": torch.ones(2, dtype=torch.int64)}
    base = checkpoint.digest(state, extra)
    assert checkpoint.digest(dict(reversed(list(state.items()))), extra) == base  # order of the keys does not count
    assert checkpoint.digest({k: v.clone() for k, v in state.items()}, extra) == base
    assert checkpoint.digest({**state, "b": torch.ones(1).expand(2)}, extra) == base  # a stride-0 view counts too
    changed = [
        {**state, "w": state["w"].clone().index_put_((torch.tensor(1), torch.tensor(2)), torch.tensor(5.5))},
        {**state, "w": state["w"].double()},  # same values, other dtype
        {**state, "w": state["w"].reshape(3, 2)},  # same bytes, other shape
        {"v" if k == "w" else k: v for k, v in state.items()},  # renamed
        {**state, "b": state["b"] * 1e30},
    ]
    assert all(checkpoint.digest(s, extra) != base for s in changed)
    assert checkpoint.digest(state, {**extra, "lambda": [0.5, 2.0]}) != base
    assert checkpoint.digest(state, {}) != base


def test_the_record_holds_the_digest_of_the_saved_weights(finished):
    """results.json's digest of each task is the one of the weights its task checkpoint holds."""
    run_dir, results = finished
    for task in results["runs"][0]["tasks"]:
        state = checkpoint.load(ckpt(run_dir, f"seed1_task{task['task']}.pt"))
        assert task["weights_sha256"] == checkpoint.digest(state["method"], state["extra"])


def _scale_weights(factor):
    def change(state):
        for k, v in state["method"].items():
            if v.is_floating_point() and "weight" in k:
                state["method"][k] = v * factor
    return change


def _edit(path, change):
    state = torch.load(path, weights_only=True)
    change(state)
    torch.save(state, path)


def _retested(run_dir) -> list[dict]:
    with open(os.path.join(run_dir, "results_retest.json")) as f:
        return json.load(f)["runs"][0]["tasks"]


def test_an_unchanged_run_retests_to_its_own_weights_and_numbers(finished, tmp_path):
    run_dir = copy_run(finished, tmp_path)
    assert main.cli(["--checkpoint_dir", run_dir, "--strict"]) == 0
    assert all(t["weights_match"] is True and t["acc_matches"] is True for t in _retested(run_dir))


def test_a_retest_of_zeroed_weights_behind_the_same_config_says_so(finished, tmp_path, capsys):
    """Weights zeroed in task 1's checkpoint, config unchanged: the re-test still runs, and its record says the
    weights and the accuracy are not the recorded ones; --strict refuses and writes nothing."""
    run_dir = copy_run(finished, tmp_path)
    _edit(ckpt(run_dir, "seed1_task1.pt"), _scale_weights(0.0))
    before = files(run_dir)
    line = fails(["--checkpoint_dir", run_dir, "--strict"], capsys)
    assert "seed 1 task 1: other weights" in line
    assert {k: v for k, v in files(run_dir).items() if k != "run.log"} == \
           {k: v for k, v in before.items() if k != "run.log"}, "--strict writes no results_retest.json"

    assert main.cli(["--checkpoint_dir", run_dir]) == 0
    task0, task1 = _retested(run_dir)
    assert task0["weights_match"] is True and task0["acc_matches"] is True
    assert task1["weights_match"] is False and task1["recorded_acc"] == finished[1]["runs"][0]["tasks"][1]["acc"]
    assert task1["acc_matches"] is False and task1["acc"] != task1["recorded_acc"]


def test_a_retest_of_weights_that_overflow_blames_the_checkpoint_not_the_learning_rate(finished, tmp_path, capsys):
    """Weights scaled by 1e30 (finite) give non-finite scores: the error names the checkpoint and says it holds
    other weights than the recorded ones."""
    run_dir = copy_run(finished, tmp_path)
    _edit(ckpt(run_dir, "seed1_task1.pt"), _scale_weights(1e30))
    line = fails(["--checkpoint_dir", run_dir], capsys)
    assert ckpt(run_dir, "seed1_task1.pt") in line and "other weights" in line and "lrate" not in line
    assert not os.path.exists(os.path.join(run_dir, "results_retest.json"))


def test_a_retest_whose_numbers_moved_says_so_even_with_the_same_weights(finished, tmp_path, capsys):
    """results.json recording another accuracy than its own weights give (edited, or measured elsewhere)."""
    run_dir = copy_run(finished, tmp_path)
    results = json.loads(open(os.path.join(run_dir, "results.json")).read())
    results["runs"][0]["tasks"][1]["acc"] += 7.0
    with open(os.path.join(run_dir, "results.json"), "w") as f:
        json.dump(results, f)
    line = fails(["--checkpoint_dir", run_dir, "--strict"], capsys)
    assert "seed 1 task 1: accuracy" in line
    assert main.cli(["--checkpoint_dir", run_dir]) == 0
    task1 = _retested(run_dir)[1]
    assert task1["weights_match"] is True and task1["acc_matches"] is False


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_pretrained_weights_with_a_non_finite_value_are_refused_before_a_run_folder(bad, tmp_path, capsys):
    """An all-NaN file, or one infinite value in one tensor, would otherwise fail later blaming the learning rate."""
    from backbone import build_backbone
    from test_robustness import DIGITS, TINY

    state = build_backbone("resnet32").state_dict()
    name = next(k for k, v in state.items() if v.is_floating_point() and v.numel() > 1)
    state[name].view(-1)[1] = bad
    path = tmp_path / "weights.pth"
    torch.save(state, path)
    line = fails(["--config", DIGITS, *TINY, "--pretrained", "true", "--pretrain_path", str(path)], capsys,
                 tmp_path / "logs")
    assert str(path) in line and name in line and "NaN or infinite" in line
    assert not os.path.exists(tmp_path / "logs")


def test_a_fifo_in_place_of_a_checkpoint_is_refused_without_hanging(finished, tmp_path, capsys):
    import time

    run_dir = rewound(finished, tmp_path)
    os.remove(ckpt(run_dir, "seed1_latest.pt"))
    os.mkfifo(ckpt(run_dir, "seed1_latest.pt"))
    start = time.perf_counter()
    line = fails(["--checkpoint_dir", run_dir], capsys)
    assert ckpt(run_dir, "seed1_latest.pt") in line and "not a regular file" in line
    assert time.perf_counter() - start < 30  # loading the config and the data included; the FIFO itself: never


def _dag(levels: int) -> list:
    node: list = []
    for _ in range(levels):
        node = [node, node]  # two references to the level below: 2**levels paths, a few bytes per level
    return node


def _nested(levels: int) -> list:
    node: list = []
    for _ in range(levels):
        node = [node]
    return node


@pytest.mark.parametrize("shape", [lambda: _dag(40), lambda: _nested(150)], ids=["shared-reference DAG", "deep"])
def test_a_checkpoint_whose_lists_expand_without_bound_is_refused_at_once(shape, finished, tmp_path, capsys):
    """weights_only pickles may share references: a small latest.pt whose record holds a 40-level DAG would hang
    whatever walks it (the digest, the results writer), and deep nesting would be a RecursionError."""
    import time

    run_dir = rewound(finished, tmp_path)
    _edit(ckpt(run_dir, "seed1_latest.pt"), lambda s: s["record"].__setitem__("notes", shape()))
    assert os.path.getsize(ckpt(run_dir, "seed1_latest.pt")) < 2 * os.path.getsize(ckpt(run_dir, "seed1_task0.pt"))
    before = files(run_dir)
    start = time.perf_counter()
    with pytest.raises(checkpoint.UserError, match="is refused: it holds"):
        checkpoint.load(ckpt(run_dir, "seed1_latest.pt"))
    assert time.perf_counter() - start < 2
    line = fails(["--checkpoint_dir", run_dir], capsys)
    assert ckpt(run_dir, "seed1_latest.pt") in line and "refused" in line
    assert files(run_dir) == before
