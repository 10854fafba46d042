"""Checkpoints: a run killed with SIGKILL mid-task and resumed ends with the same metrics; re-test; bad folders."""
import glob
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

import main
from conftest import ROOT, TINY

DIGITS = os.path.join(ROOT, "options", "finetune_il", "digits.yaml")
ARGS = ["--config", DIGITS, *TINY, "--epochs", "2", "--init_epochs", "1", "--checkpoint_every", "1", "--note", "run"]
METRICS = ("last_acc", "avg_incremental_acc", "forgetting", "bwt", "last_nme_acc")


def _results(root):
    (path,) = glob.glob(os.path.join(root, "**", "results.json"), recursive=True)
    with open(path) as f:
        return json.load(f), os.path.dirname(path)


def test_killed_run_resumes_to_the_same_results(tmp_path):
    main.main([*ARGS, "--log_root", str(tmp_path / "whole")])
    whole, _ = _results(tmp_path / "whole")

    env = dict(os.environ, OMP_NUM_THREADS=str(torch.get_num_threads()))
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "main.py"), *ARGS, "--log_root",
                             str(tmp_path / "killed")], cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    folder = tmp_path / "killed" / "finetune_il" / "digits" / "resnet32_b5i5" / "run" / "checkpoints"
    deadline = time.time() + 900
    try:  # wait for a checkpoint taken inside task 1, then kill
        while time.time() < deadline and proc.poll() is None:
            task0, latest = folder / "seed1_task0.pt", folder / "seed1_latest.pt"
            if task0.exists() and latest.exists() and latest.stat().st_mtime_ns > task0.stat().st_mtime_ns:
                proc.send_signal(signal.SIGKILL)
                break
            time.sleep(0.02)
    finally:
        proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run must be killed in the middle of task 1"
    partial, run_dir = _results(tmp_path / "killed")
    assert not partial["runs"][0].get("complete")

    main.main(["--checkpoint_dir", run_dir, "--device", "cpu"])
    resumed, _ = _results(tmp_path / "killed")
    assert resumed["runs"][0]["acc_matrix"] == whole["runs"][0]["acc_matrix"]
    for key in METRICS:
        assert resumed["runs"][0][key] == pytest.approx(whole["runs"][0][key]), key
    assert resumed["runs"][0]["complete"]


def test_finished_run_is_retested_with_the_same_numbers(tmp_path):
    main.main([*ARGS, "--epochs", "1", "--init_epochs", "1", "--save_models", "false",
               "--log_root", str(tmp_path)])
    results, run_dir = _results(tmp_path)
    assert sorted(os.listdir(os.path.join(run_dir, "checkpoints"))) == ["seed1_latest.pt"]
    main.main(["--checkpoint_dir", run_dir])
    with open(os.path.join(run_dir, "results_retest.json")) as f:
        retested = json.load(f)
    assert retested["runs"][0]["acc_matrix"] == results["runs"][0]["acc_matrix"]
    for key in METRICS:
        assert retested["runs"][0][key] == pytest.approx(results["runs"][0][key]), key
    for name in ("results.csv", "accuracy.png", "acc_matrix.png", "cost.png"):
        assert os.path.getsize(os.path.join(run_dir, name)) > 0


def test_bad_checkpoint_folders_fail_in_one_line(tmp_path, capsys):
    main.main([*ARGS, "--epochs", "1", "--init_epochs", "1", "--log_root", str(tmp_path / "logs")])
    _, run_dir = _results(tmp_path / "logs")
    (tmp_path / "empty").mkdir()
    truncated = tmp_path / "truncated"
    subprocess.run(["cp", "-r", run_dir, str(truncated)], check=True)
    os.remove(truncated / "results.json")
    for name in ("seed1_latest.pt", "seed1_task1.pt", "seed1_task0.pt"):  # nothing intact to fall back to
        with open(truncated / "checkpoints" / name, "r+b") as f:
            f.truncate(100)
    other = os.path.join(ROOT, "options", "finetune_normal", "digits.yaml")
    cases = [["--checkpoint_dir", str(tmp_path / "missing")],
             ["--checkpoint_dir", str(tmp_path / "empty")],
             ["--checkpoint_dir", str(truncated)],
             ["--checkpoint_dir", run_dir, "--config", other],
             ["--checkpoint_dir", run_dir, "--lrate", "0.5"]]
    for argv in cases:
        assert main.cli(argv) == 2, argv
        assert len(capsys.readouterr().err.strip().splitlines()) == 1
    assert os.path.isfile(os.path.join(run_dir, "results.json")), "nothing a previous run wrote is lost"


def test_a_checkpoint_older_than_a_key_resumes_when_the_run_keeps_its_default(tmp_path):
    """A checkpoint written before a key existed lacks it: the key's default (what ran then) matches it; any other
    value is another config."""
    from methods import method_config
    from trainer import checkpoint
    from trainer.config_loader import load_config
    from utils.registry import UserError

    main.main([*ARGS, "--epochs", "1", "--log_root", str(tmp_path)])
    _, run_dir = _results(tmp_path)
    path = os.path.join(run_dir, "checkpoints", "seed1_task0.pt")
    state = torch.load(path, weights_only=True)
    del state["config"]["val_split"]
    checkpoint.save(path, state)
    cfg = load_config(os.path.join(run_dir, "config.yaml"), {}, method_config)
    assert cfg.val_split == 0.0
    assert checkpoint.read(path, cfg, run_dir, 1, 2, task=0)["position"] == {"task": 0, "done": True}
    with pytest.raises(UserError, match="val_split"):
        checkpoint.read(path, cfg.replace(val_split=0.2), run_dir, 1, 2, task=0)
    with pytest.raises(UserError, match="lrate"):
        checkpoint.read(path, cfg.replace(lrate=0.5), run_dir, 1, 2, task=0)
