"""Re-testing a finished run: reload the model saved after each task and evaluate it again, into
results_retest.json beside results.json.

Every checkpoint is checked before it is used (written by this run's config for this seed at the end of that
task, trainer/checkpoint.py; its state fits the method, `Method.load_checkpoint_state`). Each task entry says
whether it was re-tested (`retested: true`) or keeps the recorded numbers (`retested: false`: no checkpoint of
it, e.g. with `save_models: false`); each seed's record lists `retested_tasks`. When no task of any seed can be
re-tested, the command fails instead of printing the old numbers. Prediction records are not rewritten.

A re-test also says whether it reproduces the run: each re-tested task's entry holds the digest of the weights it
loaded (`weights_sha256`), whether it is the one recorded when the task ended, in results.json and in the
checkpoint's own record (`weights_match`), and whether the accuracy is the recorded one (`acc_matches`). Any
difference is one warning line (`--strict`: an error): same config, other weights or other numbers is what a
tampered or swapped checkpoint looks like, and a re-test on another machine or precision says how far it moved."""
from __future__ import annotations

import logging
import os

import torch

from trainer import checkpoint
from trainer.engine.engine import NonFiniteLoss
from trainer.evaluation import task_entry
from trainer.hooks import log_task
from trainer.log import setup_logging
from trainer.results import ResultsFile, RunFolder, add_task
from trainer.resume import load_method
from trainer.task_loop import SeedRun
from utils import distributed
from utils.registry import UserError

log = logging.getLogger("cl")


def retest(cfg, device: torch.device, run_dir: str, strict: bool = False) -> str:
    """Re-test the finished run in `run_dir`; returns the folder (which now also holds results_retest.json).
    When a checkpoint holds other weights than the ones that produced results.json, or an accuracy moves, the
    re-test says so in one warning line (with `strict`: an error, and no results_retest.json is written)."""
    with RunFolder(cfg, path=run_dir) as folder:  # locked before results.json is read
        if folder.seen is None:
            raise UserError(f"nothing to re-test in {run_dir}: it holds no results.json")
        saved = {r["seed"]: r for r in folder.seen["runs"]}
        found = {seed: _checkpoints(run_dir, seed, saved[seed]) for seed in cfg.seed}
        if not any(p for paths in found.values() for p in paths.values()):
            raise UserError(f"nothing to re-test in {run_dir}: no checkpoint of any task is left in "
                            f"{checkpoint.folder(run_dir)}")
        setup_logging(os.path.join(run_dir, "run.log"), quiet=not distributed.is_main())
        log.info(f"re-testing the finished run in {run_dir} on {device}")
        results = ResultsFile(run_dir, cfg, name="results_retest")
        for seed in cfg.seed:
            results.runs.append(_retest_seed(cfg, seed, device, run_dir, saved[seed], found[seed]))
        moved = differences(results.runs)
        if moved and strict:
            raise UserError(f"the re-test of {run_dir} does not reproduce results.json: {moved}")
        if moved:
            log.warning(f"warning: the re-test does not reproduce results.json: {moved} (see results_retest.json; "
                        "--strict makes this an error)")
        results.finish()
        return run_dir


#: how far a re-tested accuracy may move (in points) before it counts as other numbers: below one test sample
#: of any of our test sets, above the float noise of the same model on the same machine
ACC_TOLERANCE = 0.005


def against_record(recorded: dict, own, weights: str) -> dict:
    """How a checkpoint compares with what results.json (`recorded`) and its own record (`own`) recorded for its
    task: whether it holds the weights that produced those results (None: both predate the digest), and the
    recorded accuracy."""
    shas = [r.get("weights_sha256") for r in (recorded, own) if isinstance(r, dict) and r.get("weights_sha256")]
    return {"weights_sha256": weights, "weights_match": all(s == weights for s in shas) if shas else None,
            "recorded_acc": recorded.get("acc")}


def differences(runs: list[dict]) -> str:
    """One line naming every re-tested task whose weights or accuracy differ from the record ('' when none)."""
    parts = []
    for run in runs:
        for t, entry in enumerate(run["tasks"]):
            if not entry.get("retested"):
                continue
            what = []
            if entry["weights_match"] is False:
                what.append("other weights than the ones that produced it")
            if not entry["acc_matches"]:
                recorded = entry["recorded_acc"]
                what.append(f"accuracy {entry['acc']:.2f} instead of "
                            + (f"{recorded:.2f}" if isinstance(recorded, (int, float)) else "(none recorded)"))
            if what:
                parts.append(f"seed {run['seed']} task {t}: {', '.join(what)}")
    return "; ".join(parts[:4]) + (f"; and {len(parts) - 4} more" if len(parts) > 4 else "")


def _checkpoints(run_dir: str, seed: int, saved: dict) -> dict[int, str | None]:
    """Task index -> the checkpoint saved after it (None: none), for every task results.json recorded. The
    latest checkpoint stands for the last task when there is no task checkpoint of it (save_models: false)."""
    n = len(saved["tasks"])
    paths = {t: checkpoint.task_path(run_dir, seed, t) for t in range(n)}
    if n and not os.path.isfile(paths[n - 1]):
        paths[n - 1] = checkpoint.latest_path(run_dir, seed)
    return {t: p if os.path.isfile(p) else None for t, p in paths.items()}


def _retest_seed(cfg, seed: int, device, run_dir: str, saved: dict, paths: dict[int, str | None]) -> dict:
    run = SeedRun(cfg, seed, device)
    data, method = run.data, run.method
    if len(saved["tasks"]) != len(data.tasks) or saved.get("class_order") != data.class_order:
        raise UserError(f"results.json of {run_dir} does not match its config.yaml for seed {seed} (tasks or class "
                        "order differ); it was not written by this run")
    record = {"seed": seed, "class_order": data.class_order, "tasks": []}
    retested = []
    for task in data.tasks:
        method.begin_task(task)
        path = paths[task.index]
        if path is not None:
            state = checkpoint.read(path, cfg, run_dir, seed, len(data.tasks), task=task.index)
            load_method(method, state, device)
            check = against_record(saved["tasks"][task.index], state["record"]["tasks"][task.index],
                                   checkpoint.digest(state["method"], state["extra"]))
            try:
                entry = dict(task_entry(method, run.engine, data, task, cfg, run.cost)[0], retested=True)
            except NonFiniteLoss:  # recorded numbers come from finite scores: this is not the model that made them
                raise UserError(f"checkpoint '{path}' gives non-finite scores when re-tested"
                                + (": it holds other weights than the ones that produced results.json"
                                   if check["weights_match"] is False else "") + "; restore the original") from None
            recorded = check["recorded_acc"]
            entry.update(check, acc_matches=isinstance(recorded, (int, float))
                         and abs(entry["acc"] - recorded) <= ACC_TOLERANCE)
            retested.append(task.index)
        else:
            entry = dict(saved["tasks"][task.index], retested=False)
        log_task(entry, cfg.eval_metric)
        add_task(record, entry)
    record["complete"] = True
    record["retested_tasks"] = retested
    missing = [t.index for t in data.tasks if t.index not in retested]
    log.info(f"seed {seed}: re-tested task(s) {', '.join(map(str, retested)) or 'none'}"
             + (f"; not re-tested (no checkpoint, recorded numbers kept): {', '.join(map(str, missing))}"
                if missing else ""))
    return record
