"""logger_type wandb: a run's offline W&B runs, read back from the files W&B writes under the run folder (the
epoch and task rows, the summary, the config), a resumed run continuing the same W&B run, and what happens
without the package or when W&B fails."""
import glob
import json
import os
import struct
import sys
from types import SimpleNamespace

import pytest

import main
from conftest import ROOT, TINY
from methods import method_config
from trainer import checkpoint
from trainer.cli import parse_overrides
from trainer.config_loader import load_config
from trainer.hooks import WandbHook, wandb_mode
from trainer.results import read_results

wandb = pytest.importorskip("wandb")

DIGITS = os.path.join(ROOT, "options", "finetune_il", "digits.yaml")
ARGS = ["--config", DIGITS, *TINY, "--img_size", "8", "--logger_type", "wandb", "--note", "run"]


@pytest.fixture(autouse=True)
def wandb_home(tmp_path, monkeypatch):
    """W&B's user-level folders in tmp_path, WANDB_MODE unset (the config's offline default decides); after the
    test, W&B's service process of this process is stopped, and none is left."""
    for name in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR", "WANDB_DIR"):
        monkeypatch.setenv(name, str(tmp_path / "wandb_home" / name.lower()))
    monkeypatch.delenv("WANDB_MODE", raising=False)
    yield
    wandb.teardown()
    assert _children_named("wandb-core") == []


def _children_named(name: str) -> list[int]:
    """The live child processes of this process whose command is `name`."""
    found = []
    for stat in glob.glob("/proc/[0-9]*/stat"):
        try:
            with open(stat) as f:
                text = f.read()
        except OSError:  # ended meanwhile
            continue
        comm, rest = text[text.index("(") + 1:text.rindex(")")], text[text.rindex(")") + 2:].split()
        if comm == name and int(rest[1]) == os.getpid() and rest[0] != "Z":
            found.append(int(stat.split("/")[2]))
    return found


def _records(path: str):
    """The protobuf records of a `run-<id>.wandb` file: a 7-byte header (':W&B', magic, version), then 32 KiB
    blocks of chunks (checksum u32, length u16, type u8: 1 full, 2 first, 3 middle, 4 last; a block's tail shorter
    than a chunk header is padding)."""
    from wandb.proto import wandb_internal_pb2

    with open(path, "rb") as f:
        data = f.read()
    assert data[:4] == b":W&B"
    pos, pending = 7, b""
    while pos + 7 <= len(data):
        if 32768 - pos % 32768 < 7:
            pos += 32768 - pos % 32768
            continue
        length, kind = struct.unpack("<HB", data[pos + 4:pos + 7])
        pending += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            pending = b""
            yield record


def offline_runs(run_dir: str) -> list[dict]:
    """Each offline W&B run under the run folder, oldest first: its id, config, history rows and summary."""
    def items(updates):
        return {(u.key or "/".join(u.nested_key)): json.loads(u.value_json) for u in updates}

    runs = []
    for folder in sorted(glob.glob(os.path.join(run_dir, "wandb", "offline-run-*"))):
        (path,) = glob.glob(os.path.join(folder, "run-*.wandb"))
        run = {"folder": folder, "config": {}, "history": [], "summary": {}}
        for record in _records(path):
            kind = record.WhichOneof("record_type")
            if kind == "run":
                run.update(id=record.run.run_id, group=record.run.run_group, resumed=record.run.resume)
                run["config"].update(items(record.run.config.update))
            elif kind == "config":
                run["config"].update(items(record.config.update))
            elif kind == "history":
                run["history"].append(items(record.history.item))
            elif kind == "summary":
                run["summary"].update(items(record.summary.update))
        runs.append(run)
    return runs


def saved_id(run_dir: str, seed: int = 1) -> str:
    with open(os.path.join(run_dir, f"wandb_seed{seed}.json")) as f:
        return json.load(f)["id"]


class _Stop(Exception):
    pass


def test_an_offline_run_cut_and_resumed_is_one_wandb_run_holding_every_epoch_task_summary_and_config(
        run_main, tmp_path, monkeypatch):
    """The run stops after task 0's checkpoint (as a kill would leave it) and is resumed with --checkpoint_dir: two
    offline folders of the same W&B run, the first with task 0, the second with task 1, the summary and the table,
    every number equal to results.json's."""
    save = checkpoint.save

    def save_then_stop(path, state):
        save(path, state)
        if state["position"] == {"task": 0, "done": True}:
            raise _Stop

    monkeypatch.setattr(checkpoint, "save", save_then_stop)
    with pytest.raises(_Stop):
        run_main(*ARGS)
    monkeypatch.setattr(checkpoint, "save", save)
    (run_dir,) = glob.glob(str(tmp_path / "logs" / "**" / "run"), recursive=True)
    record = read_results(main.main(["--checkpoint_dir", run_dir, "--device", "cpu"]))["runs"][0]
    first, second = offline_runs(run_dir)
    assert first["id"] == second["id"] == saved_id(run_dir) and second["resumed"] and first["group"] == "run"
    assert first["config"]["seed"] == 1 and first["config"]["method"] == "finetune_il"
    assert first["config"]["logger_type"] == "wandb" and first["config"]["wandb_mode"] == "offline"
    history = first["history"] + second["history"]
    epochs = [row for row in history if "train/ce" in row]
    assert [(row["epoch"], row["task"]) for row in epochs] == [(1, 0), (2, 1)]  # the epoch axis goes on
    assert [row["epoch"] for row in second["history"] if "train/ce" in row] == [2]
    assert all(row["train/lr"] >= 0 for row in epochs)
    assert [row["task"] for row in first["history"] if "acc" in row] == [0]
    tasks = [row for row in history if "acc" in row]
    assert [row["task"] for row in tasks] == [0, 1]
    for row, entry in zip(tasks, record["tasks"]):
        assert row["acc"] == entry["acc"] and row["gflops"] == entry["gflops"] and row["params"] == entry["params"]
        assert [row[f"acc_matrix/task_{j}"] for j in range(entry["task"] + 1)] == entry["acc_per_task"]
        assert row.get("old_acc") == entry["old_acc"] and row["nme_acc"] == entry["nme_acc"]
    assert second["summary"]["last_acc"] == record["last_acc"] and second["summary"]["bwt"] == record["bwt"]
    assert second["summary"]["accuracy_matrix/_type"] == "table-file"  # nested keys read back joined by '/'
    (table,) = glob.glob(os.path.join(second["folder"], "files", "media", "table", "accuracy_matrix_*.table.json"))
    with open(table) as f:
        assert [row[1:] for row in json.load(f)["data"]] == record["acc_matrix"]


def test_without_the_package_the_run_stops_with_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb raises ImportError
    code = main.cli([*ARGS, "--log_root", str(tmp_path)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "pip install wandb" in err[0]
    assert os.listdir(tmp_path) == ["wandb_home"] or not os.listdir(tmp_path), "nothing written"


def _cfg(*argv):
    return load_config(DIGITS, parse_overrides([*TINY, *argv]), method_config)


def test_a_failing_wandb_costs_the_logging_not_the_run(tmp_path, monkeypatch):
    def broken(**kwargs):
        raise RuntimeError("no W&B today")

    monkeypatch.setattr(wandb, "init", broken)
    hook = WandbHook(_cfg("--logger_type", "wandb"), str(tmp_path))
    hook.before_run(SimpleNamespace(seed=3))
    assert hook.wb is None and saved_id(str(tmp_path), 3)
    hook.after_task(None, {"task": 0})  # nothing to log to: nothing happens
    hook.after_run(None)


def test_the_environment_can_only_take_wandb_offline(monkeypatch):
    online = _cfg("--logger_type", "wandb", "--wandb_mode", "online")
    assert wandb_mode(online) == "online" and wandb_mode(_cfg()) == "offline"
    for env in ("offline", "disabled"):
        monkeypatch.setenv("WANDB_MODE", env)
        assert wandb_mode(online) == env
    monkeypatch.setenv("WANDB_MODE", "online")
    assert wandb_mode(_cfg()) == "offline"


@pytest.mark.parametrize("content", ["fifo", "link", '{"id": "../../../escaped", "epoch": 0}',
                                     '{"id": "0123456789abcdef", "epoch": -1}', "x" * 5000, "[1, 2]"],
                         ids=["fifo", "link", "escaping-id", "negative-count", "huge", "foreign"])
def test_a_hostile_id_file_costs_the_logging_and_nothing_else(tmp_path, monkeypatch, content):
    """wandb_seed<S>.json as someone else left it: a FIFO (must not block), a link (not followed), an id that
    would name a folder outside the run folder, a bad count, a huge or foreign file. W&B is not started with it,
    the file is left as it is, and the seed goes on without W&B."""
    import threading

    calls = []
    monkeypatch.setattr(wandb, "init", lambda **kwargs: calls.append(kwargs))
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    path = run_dir / "wandb_seed1.json"
    target = tmp_path / "elsewhere.json"
    target.write_text('{"id": "0123456789abcdef", "epoch": 0}')
    if content == "fifo":
        os.mkfifo(path)
    elif content == "link":
        path.symlink_to(target)
    else:
        path.write_text(content)
    hook = WandbHook(_cfg("--logger_type", "wandb"), str(run_dir))
    worker = threading.Thread(target=hook.before_run, args=(SimpleNamespace(seed=1),), daemon=True)
    worker.start()
    worker.join(timeout=20)
    assert not worker.is_alive(), "reading the id file blocked"
    assert hook.wb is None and calls == []
    assert set(os.listdir(tmp_path)) <= {"run", "elsewhere.json", "wandb_home"}
    assert os.listdir(run_dir) == ["wandb_seed1.json"]
    assert target.read_text() == '{"id": "0123456789abcdef", "epoch": 0}'
    if content not in ("fifo", "link"):
        assert path.read_text() == content
