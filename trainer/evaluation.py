"""Evaluation after a task: the accuracy of every classifier `method.predict` returns (on the test data of the
seen classes, per task and old/new), task-id accuracy for routing methods, the inference cost, and open-set
scores. One `Engine.infer` pass serves every classifier. With `val_split` > 0, a second pass over the seen classes'
held-out training samples (datasets/scenario.py) gives the validation accuracy; without, it costs nothing."""
from __future__ import annotations

import numpy as np
import torch

from trainer.guards import refuse_non_finite
from trainer.metrics import score, task_scores


def evaluate(method, engine, data, task, cfg, split: str = "test") -> dict:
    """Accuracy (or mcr) of every classifier `method.predict` returns, on the test data of the seen classes (or,
    with `split="val"`, on their validation samples)."""
    samples = data.dataset(split, data.indices(split, range(task.total)))  # un-augmented
    scores, y = engine.infer(method.predict, samples, method)
    refuse_non_finite(scores, f"when evaluated in task {task.index}")
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


def openset_scores(method, engine, data, task) -> dict | None:
    """Seen classes (known) against every test sample of later tasks (unknown), scored by the method's
    confidence: AUROC, FPR at 95% TPR, and average precision with 'known' as the positive class."""
    from sklearn.metrics import average_precision_score, roc_auc_score, roc_curve

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


def task_entry(method, engine, data, task, cfg, cost) -> tuple[dict, dict | None]:
    """The results.json entry of a task (every classifier, inference cost (`cost`, a trainer.flops.InferenceCost),
    open-set scores, with `val_split` > 0 the validation accuracy `val_acc` and its per-task row
    `val_acc_per_task`), and, with `save_pred_record`, the test targets and each classifier's predictions."""
    result = evaluate(method, engine, data, task, cfg)
    gflops, params = cost(method, data.img_size, engine.device)
    main = result[method.record]
    entry = {"task": task.index, "classes": [task.known, task.total], "acc": main["acc"],
             "acc_per_task": main["acc_per_task"], "old_acc": _or_none(main["old_acc"]),
             "new_acc": _or_none(main["new_acc"]), "cnn_acc": result["cnn"]["acc"],
             "nme_acc": result["nme"]["acc"] if "nme" in result else None, "gflops": gflops, "params": params}
    if "task_id_acc" in result:
        entry["task_id_acc"] = result["task_id_acc"]
    if cfg.val_split > 0:  # absent otherwise: a run without a validation set keeps its entries and its cost
        entry["val_acc"], entry["val_acc_per_task"] = None, [None] * (task.index + 1)
        if len(data.indices("val", range(task.total))):  # none when every seen class has a single sample
            val = evaluate(method, engine, data, task, cfg, "val")[method.record]
            entry["val_acc"], entry["val_acc_per_task"] = _or_none(val["acc"]), [_or_none(v) for v in
                                                                                 val["acc_per_task"]]
    if cfg.openset_test:
        entry["openset"] = openset_scores(method, engine, data, task)
    predictions = None
    if cfg.save_pred_record:
        predictions = {"targets": result["targets"], **{k: v["pred"] for k, v in result.items() if isinstance(v, dict)}}
    return entry, predictions


def _or_none(v: float) -> float | None:
    """NaN (no old classes in the first task) is written as null: results.json stays strict JSON."""
    return None if np.isnan(v) else float(v)
