"""Inference cost: fvcore on the method's real predict forward."""
import pytest
import torch
from torch import nn

from methods import build_method, method_config
from utils.config import load_config
from datasets.scenario import DataManager
from utils.flops import inference_cost


def _method(backbone):
    cfg = load_config(None, {"method": "finetune_il", "dataset": "digits", "backbone": backbone, "device": "cpu"},
                      method_config)
    data = DataManager(cfg, seed=1)
    method = build_method(cfg, data)
    method.task = data.tasks[0]
    method.before_task(data.tasks[0])
    return method


def test_resnet18_at_224_is_about_1_82_gflops():
    method = _method("resnet18")
    gflops, params = inference_cost(method, 224, torch.device("cpu"))
    assert gflops == pytest.approx(1.8186, abs=0.005)  # fvcore counts one multiply-add as one flop
    assert params == sum(p.numel() for p in method.network.parameters())


def test_modules_not_used_at_test_time_are_not_counted():
    method = _method("resnet32")
    before = inference_cost(method, 32, torch.device("cpu"))
    method.teacher = nn.Linear(1000, 1000)  # e.g. a frozen distillation teacher, never called by predict
    assert inference_cost(method, 32, torch.device("cpu")) == before
