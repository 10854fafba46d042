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
from utils.flops import inference_cost
from utils.logging import close_logging, setup_logging
from utils.metrics import mean_std, score, summarize, task_scores
from utils.seed import set_seed
from utils.train_loop import Engine

log = logging.getLogger("cl")
RUN_KEYS = ("last_acc", "avg_incremental_acc", "forgetting", "bwt", "last_nme_acc", "avg_incremental_nme_acc")


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


def run_seed(cfg, seed: int, device: torch.device, run_dir: str, on_task=None) -> dict:
    set_seed(seed)
    single = METHODS.meta(cfg.method)["method_type"] == "single_step"
    data = DataManager(cfg, seed, single_task=single)
    method = build_method(cfg, data)
    writer = None
    if cfg.logger_type == "tensorboard":
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(os.path.join(run_dir, "tensorboard", f"seed{seed}"))
    engine = Engine(device, cfg.num_workers, cfg.amp, cfg.test_epoch, writer)
    record = {"seed": seed, "class_order": data.class_order, "tasks": []}
    rows, totals, nme_totals = [], [], []
    log.info(f"seed {seed}: {len(data.tasks)} tasks {[t.total - t.known for t in data.tasks]}, "
             f"class order {data.class_order}")
    for task in data.tasks:
        method.task = task
        engine.task_index = task.index
        engine.epoch_eval = lambda: evaluate(method, engine, data, task, cfg)[method.record]["acc"]
        start = time.perf_counter()
        method.before_task(task)
        method.to(device)
        method.train_task(task, data.dataset("train", data.indices("train", task.classes)), engine)
        method.after_task(task, engine)
        train_time = time.perf_counter() - start
        result = evaluate(method, engine, data, task, cfg)
        gflops, params = inference_cost(method, data.img_size, device)
        main = result[method.record]
        entry = {"task": task.index, "classes": [task.known, task.total], "acc": main["acc"],
                 "acc_per_task": main["acc_per_task"], "old_acc": main["old_acc"], "new_acc": main["new_acc"],
                 "cnn_acc": result["cnn"]["acc"], "nme_acc": result["nme"]["acc"] if "nme" in result else None,
                 "gflops": gflops, "params": params, "train_time_s": train_time}
        if "task_id_acc" in result:
            entry["task_id_acc"] = result["task_id_acc"]
        if cfg.openset_test:
            entry["openset"] = openset_scores(method, engine, data, task)
        if cfg.save_pred_record:
            np.savez(os.path.join(run_dir, f"pred_record_seed{seed}_task{task.index}.npz"), targets=result["targets"],
                     **{k: v["pred"] for k, v in result.items() if isinstance(v, dict)})
        record["tasks"].append(entry)
        rows.append(main["acc_per_task"])
        totals.append(main["acc"])
        if entry["nme_acc"] is not None:
            nme_totals.append(entry["nme_acc"])
        record.update(summarize(totals, rows))
        if nme_totals:
            record["last_nme_acc"], record["avg_incremental_nme_acc"] = nme_totals[-1], float(np.mean(nme_totals))
        log.info(f"task {task.index}: {cfg.eval_metric} {main['acc']:.2f} (per task "
                 f"{', '.join(f'{a:.1f}' for a in main['acc_per_task'])}; old {_pct(main['old_acc'])} new "
                 f"{_pct(main['new_acc'])})" + (f" nme {entry['nme_acc']:.2f}" if entry["nme_acc"] is not None else "")
                 + f" | {gflops:.4f} GFLOPs, {params / 1e6:.3f} M params, {train_time:.1f} s")
        if on_task is not None:
            on_task(record)
    if writer is not None:
        writer.close()
    log.info(f"seed {seed}: last {cfg.eval_metric} {record['last_acc']:.2f}, average incremental "
             f"{record['avg_incremental_acc']:.2f}, forgetting {record['forgetting']:.2f}, BWT {record['bwt']:.2f}")
    return record


def _pct(v: float) -> str:
    return "-" if np.isnan(v) else f"{v:.2f}"


def summary(runs: list[dict]) -> dict:
    out = {k: mean_std([r.get(k) for r in runs]) for k in RUN_KEYS if any(r.get(k) is not None for r in runs)}
    out["final_gflops"] = mean_std([r["tasks"][-1]["gflops"] for r in runs])
    out["final_params"] = mean_std([r["tasks"][-1]["params"] for r in runs])
    out["train_time_s"] = mean_std([sum(t["train_time_s"] for t in r["tasks"]) for r in runs])
    return out


def run(cfg, device: torch.device, log_root: str = "logs") -> tuple[dict, str]:
    """Train every seed in turn; returns the results and the run folder (which holds results.json)."""
    run_dir = run_folder(cfg, log_root)
    setup_logging(os.path.join(run_dir, "run.log"))
    try:
        with open(os.path.join(run_dir, "config.yaml"), "w") as f:
            yaml.safe_dump(cfg.to_dict(), f, sort_keys=False)
        log.info(f"run folder {run_dir} | method {cfg.method}, dataset {cfg.dataset}, backbone {cfg.backbone}, "
                 f"device {device}")
        results = {"config": cfg.to_dict(), "class_order": {}, "runs": [], "summary": {}}
        path = os.path.join(run_dir, "results.json")
        for seed in cfg.seed:
            def save(record, seed=seed):
                results["class_order"][str(seed)] = record["class_order"]
                write_json(path, {**results, "runs": results["runs"] + [record]})

            results["runs"].append(run_seed(cfg, seed, device, run_dir, on_task=save))
            results["summary"] = summary(results["runs"])
            write_json(path, results)
        s = results["summary"]
        log.info(f"done: last {cfg.eval_metric} {s['last_acc']['mean']:.2f} ± {s['last_acc']['std']:.2f}, average "
                 f"incremental {s['avg_incremental_acc']['mean']:.2f} ± {s['avg_incremental_acc']['std']:.2f}, "
                 f"forgetting {s['forgetting']['mean']:.2f}, {s['final_gflops']['mean']:.4f} GFLOPs "
                 f"({len(cfg.seed)} seed(s)); results in {path}")
        return results, run_dir
    finally:
        close_logging()
