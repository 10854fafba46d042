"""THE task loop: for each task, before_task -> train_task -> after_task -> evaluate, then the metrics.

One `run_seed` per seed, with nothing shared between seeds (fresh data manager, method, RNG and logger).
`results.json` is rewritten atomically after every task, so an interrupted run keeps what it measured.
"""
from __future__ import annotations

import datetime
import json
import logging
import os
import time

import numpy as np
import torch
import yaml
from sklearn.metrics import average_precision_score, roc_auc_score, roc_curve

from datasets import DATASETS
from methods import METHODS, build_method
from utils.data_manager import DataManager
from utils import checkpoint
from utils.checkpoint import rng_state, set_rng_state
from utils.flops import inference_cost
from utils import report
from utils.logging import close_logging, setup_logging
from utils.metrics import mean_std, score, summarize, task_scores
from utils.seed import set_seed
from utils.registry import UserError
from utils.train_loop import Engine

log = logging.getLogger("cl")
RUN_KEYS = ("last_acc", "avg_incremental_acc", "forgetting", "bwt", "last_cnn_acc", "last_nme_acc",
            "avg_incremental_nme_acc")


def run_folder(cfg, root: str = "logs") -> str:
    """logs/<method>/<dataset>/<backbone>_b<init>i<inc>/<note or timestamp>/, never an existing folder."""
    spec = DATASETS.get(cfg.dataset)
    if spec.task_groups:
        split = f"tasks{len(spec.task_groups)}"
    else:
        init = cfg.init_cls or spec.default_init_cls or cfg.increment
        split = f"b{init}i{cfg.increment or spec.default_increment or init}"
    parent = os.path.join(root, cfg.method, cfg.dataset, f"{cfg.backbone}_{split}")
    stamp = datetime.datetime.now().strftime("%Y%m%d_%H%M%S")
    folder = os.path.join(parent, cfg.note or stamp)
    if os.path.exists(folder):
        folder = f"{folder}_{stamp}"
    suffix = 1
    while os.path.exists(folder):
        folder, suffix = f"{folder.rsplit('~', 1)[0]}~{suffix}", suffix + 1
    os.makedirs(folder)
    return folder


def write_json(path: str, data) -> None:
    """Write JSON atomically: a temporary file, then a rename."""
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(data, f, indent=1)
    os.replace(tmp, path)


def evaluate(method, engine: Engine, data: DataManager, task, cfg) -> dict:
    """Accuracy (or mcr) of every classifier `method.predict` returns, on the test data of the seen classes."""
    test = data.dataset("test", data.indices("test", range(task.total)))
    scores, y = engine.infer(method.predict, test, method)
    y = y.numpy()
    result = {}
    if "task_id" in scores:  # a routing method also returns the task it picked for each sample
        result["task_id_acc"] = float(100.0 * np.mean(scores.pop("task_id").numpy() == data.class_of_task()[y]))
    bounds = [(t.known, t.total) for t in data.tasks[: task.index + 1]]
    if cfg.incre_type == "til":  # predict within the sample's own task
        lo = torch.as_tensor([t.known for t in data.tasks])[data.class_of_task()[y]]
        hi = torch.as_tensor([t.total for t in data.tasks])[data.class_of_task()[y]]
        cols = torch.arange(task.total)
        scores = {k: v.masked_fill((cols < lo[:, None]) | (cols >= hi[:, None]), float("-inf"))
                  for k, v in scores.items()}
    for key, value in scores.items():
        pred = value.argmax(1).numpy()
        result[key] = {"acc": score(y, pred, cfg.eval_metric),
                       "acc_per_task": task_scores(y, pred, bounds, cfg.eval_metric),
                       "old_acc": score(y[y < task.known], pred[y < task.known], cfg.eval_metric),
                       "new_acc": score(y[y >= task.known], pred[y >= task.known], cfg.eval_metric)}
        if cfg.save_pred_record:
            result[key]["pred"] = pred
    result["targets"] = y
    return result


def openset_scores(method, engine: Engine, data: DataManager, task) -> dict | None:
    """Seen classes (known) against every test sample of later tasks (unknown), scored by the method's
    confidence: AUROC, FPR at 95% TPR, and average precision with 'known' as the positive class."""
    if task.index == len(data.tasks) - 1:
        return None
    test = data.dataset("test", data.indices("test", range(data.n_classes)))
    scores, y = engine.infer(method.predict, test, method)
    scores.pop("task_id", None)
    confidence = method.openset_confidence(scores).numpy()
    known = (y.numpy() < task.total).astype(int)
    fpr, tpr, _ = roc_curve(known, confidence)
    return {"auroc": 100 * roc_auc_score(known, confidence), "fpr95": 100 * float(fpr[np.searchsorted(tpr, 0.95)]),
            "ap": 100 * average_precision_score(known, confidence)}


def _build(cfg, seed: int, device: torch.device, run_dir: str):
    set_seed(seed)
    single = METHODS.meta(cfg.method)["method_type"] == "single_step"
    data = DataManager(cfg, seed, single_task=single)
    method = build_method(cfg, data)
    writer = None
    if cfg.logger_type == "tensorboard":
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(os.path.join(run_dir, "tensorboard", f"seed{seed}"))
    return data, method, Engine(device, cfg.num_workers, cfg.amp, cfg.test_epoch, writer)


def _restore(method, engine: Engine, data: DataManager, state: dict, device: torch.device) -> int:
    """Rebuild the method's structure up to the checkpoint's task, load its state; returns the task to run next.
    Inside a task, the engine is told where to continue (stage, epoch, optimiser, RNG)."""
    position = state["position"]
    for task in data.tasks[: position["task"] + 1]:
        method.task = task
        method.before_task(task)
    _load(method, state, device)
    if position["done"]:
        set_rng_state(state["rng"])
        return position["task"] + 1
    engine.resume_from = {"fit_index": position["fit_index"], "epoch": position["epoch"],
                          "optimizer": state["optimizer"], "scheduler": state["scheduler"],
                          "restore_rng": lambda: set_rng_state(state["rng"])}
    return position["task"]


def _load(method, state: dict, device: torch.device) -> None:
    method.to(device)
    method.load_state_dict(state["method"])
    method.load_extra_state(state["extra"])


def task_entry(method, engine: Engine, data: DataManager, task, cfg, run_dir: str, seed: int) -> dict:
    """Evaluate after a task: every classifier, inference cost, open-set scores, prediction records."""
    result = evaluate(method, engine, data, task, cfg)
    gflops, params = inference_cost(method, data.img_size, engine.device)
    main = result[method.record]
    entry = {"task": task.index, "classes": [task.known, task.total], "acc": main["acc"],
             "acc_per_task": main["acc_per_task"], "old_acc": _or_none(main["old_acc"]),
             "new_acc": _or_none(main["new_acc"]), "cnn_acc": result["cnn"]["acc"],
             "nme_acc": result["nme"]["acc"] if "nme" in result else None, "gflops": gflops, "params": params}
    if "task_id_acc" in result:
        entry["task_id_acc"] = result["task_id_acc"]
    if cfg.openset_test:
        entry["openset"] = openset_scores(method, engine, data, task)
    if cfg.save_pred_record:
        np.savez(os.path.join(run_dir, f"pred_record_seed{seed}_task{task.index}.npz"), targets=result["targets"],
                 **{k: v["pred"] for k, v in result.items() if isinstance(v, dict)})
    log.info(f"task {task.index}: {cfg.eval_metric} {main['acc']:.2f} (per task "
             f"{', '.join(f'{a:.1f}' for a in main['acc_per_task'])}; old {_pct(main['old_acc'])} new "
             f"{_pct(main['new_acc'])})" + (f" nme {entry['nme_acc']:.2f}" if entry["nme_acc"] is not None else "")
             + f" | {gflops:.4f} GFLOPs, {params / 1e6:.3f} M params")
    return entry


def add_task(record: dict, entry: dict) -> None:
    """Append a task's entry and recompute the run-level metrics from all entries."""
    record["tasks"].append(entry)
    tasks = record["tasks"]
    record.update(summarize([t["acc"] for t in tasks], [t["acc_per_task"] for t in tasks]))
    record["last_cnn_acc"] = tasks[-1]["cnn_acc"]
    nme = [t["nme_acc"] for t in tasks if t["nme_acc"] is not None]
    if nme:
        record["last_nme_acc"], record["avg_incremental_nme_acc"] = nme[-1], float(np.mean(nme))


def run_seed(cfg, seed: int, device: torch.device, run_dir: str, on_task=None, resume: dict | None = None) -> dict:
    """Train one seed task by task (continuing from the checkpoint `resume` if given); returns its record."""
    data, method, engine = _build(cfg, seed, device, run_dir)
    record = {"seed": seed, "class_order": data.class_order, "tasks": []}
    first = 0
    if resume is not None:
        record = resume["record"]
        first = _restore(method, engine, data, resume, device)
    os.makedirs(checkpoint.folder(run_dir), exist_ok=True)

    def save(position: dict, **extra) -> None:
        state = {"config": cfg.to_dict(), "seed": seed, "position": position, "method": method.state_dict(),
                 "extra": method.extra_state(), "rng": rng_state(), "record": record, **extra}
        checkpoint.save(checkpoint.latest_path(run_dir, seed), state)
        if position["done"] and cfg.save_models:
            checkpoint.save(checkpoint.task_path(run_dir, seed, position["task"]), state)

    def save_mid_task(fit_index, epoch, optimizer, scheduler):
        if cfg.checkpoint_every and epoch % cfg.checkpoint_every == 0:
            save({"task": engine.task_index, "done": False, "fit_index": fit_index, "epoch": epoch},
                 optimizer=optimizer.state_dict(), scheduler=scheduler.state_dict() if scheduler else None)

    engine.on_epoch_end = save_mid_task
    log.info(f"seed {seed}: {len(data.tasks)} tasks {[t.total - t.known for t in data.tasks]}, "
             f"class order {data.class_order}" + (f"; resuming at task {first}" if resume is not None else ""))
    for task in data.tasks[first:]:
        method.task = task
        engine.start_task(task.index)
        engine.epoch_eval = lambda: evaluate(method, engine, data, task, cfg)[method.record]["acc"]
        start = time.perf_counter()
        if engine.resume_from is None:  # a resumed task already rebuilt its structure
            method.before_task(task)
        method.to(device)
        method.train_task(task, data.dataset("train", data.indices("train", task.classes)), engine)
        method.after_task(task, engine)
        train_time = time.perf_counter() - start
        entry = task_entry(method, engine, data, task, cfg, run_dir, seed)
        entry["train_time_s"] = train_time
        add_task(record, entry)
        if task.index == len(data.tasks) - 1:
            record["complete"] = True
        save({"task": task.index, "done": True})
        if on_task is not None:
            on_task(record)
    if engine.writer is not None:
        for i, t in enumerate(record["tasks"]):
            engine.writer.add_scalar("acc/seen_classes", t["acc"], i)
        engine.writer.close()
    log.info(f"seed {seed}: last {cfg.eval_metric} {record['last_acc']:.2f}, average incremental "
             f"{record['avg_incremental_acc']:.2f}, forgetting {record['forgetting']:.2f}, BWT {record['bwt']:.2f}")
    return record


def _pct(v: float) -> str:
    return "-" if np.isnan(v) else f"{v:.2f}"


def _or_none(v: float) -> float | None:
    """NaN (no old classes in the first task) is written as null: results.json stays strict JSON."""
    return None if np.isnan(v) else v


def summary(runs: list[dict]) -> dict:
    if not runs:
        return {}
    out = {k: mean_std([r.get(k) for r in runs]) for k in RUN_KEYS if any(r.get(k) is not None for r in runs)}
    out["final_gflops"] = mean_std([r["tasks"][-1]["gflops"] for r in runs])
    out["final_params"] = mean_std([r["tasks"][-1]["params"] for r in runs])
    out["train_time_s"] = mean_std([sum(t.get("train_time_s", 0.0) for t in r["tasks"]) for r in runs])
    return out


def _finish(results: dict, cfg, run_dir: str, name: str = "results") -> None:
    results["summary"] = summary([r for r in results["runs"] if r.get("complete")])
    write_json(os.path.join(run_dir, f"{name}.json"), results)
    report.write_csv(results, os.path.join(run_dir, f"{name}.csv"))
    report.plot(results, run_dir, prefix="" if name == "results" else f"{name}_")
    s = results["summary"]
    log.info(f"done: last {cfg.eval_metric} {s['last_acc']['mean']:.2f} ± {s['last_acc']['std']:.2f}, average "
             f"incremental {s['avg_incremental_acc']['mean']:.2f} ± {s['avg_incremental_acc']['std']:.2f}, "
             f"forgetting {s['forgetting']['mean']:.2f}, {s['final_gflops']['mean']:.4f} GFLOPs "
             f"({len(results['runs'])} seed(s)); results in {os.path.join(run_dir, name + '.json')}")


def run(cfg, device: torch.device, log_root: str = "logs", run_dir: str | None = None) -> tuple[dict, str]:
    """Train every seed in turn, or, given the folder of an unfinished run, continue it from its checkpoints.
    Returns the results and the run folder (which holds results.json)."""
    resuming = run_dir is not None
    run_dir = run_dir or run_folder(cfg, log_root)
    setup_logging(os.path.join(run_dir, "run.log"))
    try:
        path = os.path.join(run_dir, "results.json")
        if resuming and os.path.isfile(path):
            with open(path) as f:
                results = json.load(f)
            results["runs"] = [r for r in results["runs"] if r.get("complete")]
        else:
            write_config(cfg, os.path.join(run_dir, "config.yaml"))
            results = {"config": cfg.to_dict(), "class_order": {}, "runs": [], "summary": {}}
        log.info(f"run folder {run_dir} | method {cfg.method}, dataset {cfg.dataset}, backbone {cfg.backbone}, "
                 f"device {device}" + (" | resuming" if resuming else ""))
        done = {r["seed"] for r in results["runs"]}
        for seed in cfg.seed:
            if seed in done:
                continue
            latest = checkpoint.latest_path(run_dir, seed)
            state = checkpoint.load(latest) if resuming and os.path.isfile(latest) else None
            if state is not None and _without_runtime(state["config"]) != _without_runtime(cfg.to_dict()):
                raise UserError(f"checkpoint '{latest}' was written with another config than {run_dir}/config.yaml")

            def save(record, seed=seed):
                results["class_order"][str(seed)] = record["class_order"]
                write_json(path, {**results, "runs": results["runs"] + [record]})

            results["runs"].append(run_seed(cfg, seed, device, run_dir, on_task=save, resume=state))
            write_json(path, results)
        _finish(results, cfg, run_dir)
        return results, run_dir
    finally:
        close_logging()


def retest(cfg, device: torch.device, run_dir: str) -> dict:
    """Reload the saved models of a finished run and evaluate them again (results_retest.json). Tasks without a
    saved model (save_models: false keeps only the last) keep their recorded numbers."""
    setup_logging(os.path.join(run_dir, "run.log"))
    try:
        log.info(f"re-testing the finished run in {run_dir} on {device}")
        results = {"config": cfg.to_dict(), "class_order": {}, "runs": []}
        for seed in cfg.seed:
            data, method, engine = _build(cfg, seed, device, run_dir)
            with open(os.path.join(run_dir, "results.json")) as f:
                saved = next(r for r in json.load(f)["runs"] if r["seed"] == seed)
            record = {"seed": seed, "class_order": data.class_order, "tasks": []}
            for task in data.tasks:
                method.task = task
                method.before_task(task)
                path = checkpoint.task_path(run_dir, seed, task.index)
                if not os.path.isfile(path) and task.index == len(data.tasks) - 1:
                    path = checkpoint.latest_path(run_dir, seed)
                if os.path.isfile(path):
                    _load(method, checkpoint.load(path), device)
                    engine.start_task(task.index)
                    entry = task_entry(method, engine, data, task, cfg, run_dir, seed)
                else:
                    entry = dict(saved["tasks"][task.index], retested=False)
                add_task(record, entry)
            record["complete"] = True
            results["class_order"][str(seed)] = record["class_order"]
            results["runs"].append(record)
        _finish(results, cfg, run_dir, name="results_retest")
        return results
    finally:
        close_logging()


def _without_runtime(config: dict) -> dict:
    from utils.config import RUNTIME_KEYS

    return {k: v for k, v in config.items() if k not in RUNTIME_KEYS}


def write_config(cfg, path: str) -> None:
    """The resolved config as a config file of our own schema (every key under basic:)."""
    with open(path, "w") as f:
        yaml.safe_dump({"basic": cfg.to_dict()}, f, sort_keys=False)


def saved_config(run_dir: str, config_path: str | None, cli: dict, method_keys):
    """The config of the run in `run_dir`; command-line keys may only change where it runs, and a --config given
    beside it must resolve to the same config."""
    from utils.config import RUNTIME_KEYS, load_config

    if not os.path.isdir(run_dir):
        raise UserError(f"--checkpoint_dir '{run_dir}' does not exist")
    saved_path = os.path.join(run_dir, "config.yaml")
    if not os.path.isfile(saved_path):
        raise UserError(f"--checkpoint_dir '{run_dir}' is not a run folder (no config.yaml); give the folder a run "
                        "printed when it started")
    changed = sorted(set(cli) - set(RUNTIME_KEYS))
    if changed:
        raise UserError(f"--{changed[0]} cannot change when resuming or re-testing a run (only "
                        f"{', '.join(RUNTIME_KEYS)} can); start a new run instead")
    cfg = load_config(saved_path, cli, method_keys)
    if config_path:
        given = load_config(config_path, cli, method_keys).to_dict()
        diff = [k for k, v in cfg.to_dict().items() if k not in RUNTIME_KEYS and given.get(k) != v]
        if diff:
            raise UserError(f"--checkpoint_dir '{run_dir}' holds a run of another config: '{diff[0]}' is "
                            f"{cfg.to_dict()[diff[0]]!r} there and {given.get(diff[0])!r} in {config_path}")
    return cfg


def is_finished(run_dir: str, cfg) -> bool:
    path = os.path.join(run_dir, "results.json")
    if not os.path.isfile(path):
        return False
    try:
        with open(path) as f:
            runs = json.load(f)["runs"]
    except (ValueError, KeyError):
        raise UserError(f"'{path}' is corrupt; remove it to resume from the checkpoints") from None
    return {r["seed"] for r in runs if r.get("complete")} >= set(cfg.seed)
