"""Inference cost: fvcore on the method's real predict forward."""
import pytest
import torch
from torch import nn

from methods import build_method, method_config
from trainer.config_loader import load_config
from datasets.scenario import DataManager
from trainer.flops import inference_cost


def _method(backbone):
    cfg = load_config(None, {"method": "finetune_il", "dataset": "digits", "backbone": backbone, "device": "cpu"},
                      method_config)
    data = DataManager(cfg, seed=1)
    method = build_method(cfg, data)
    method.begin_task(data.tasks[0])
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


class _Tiny(nn.Module):
    """A method stand-in whose predict runs conv(3 -> 4, 3x3, padding 1) -> ReLU -> flatten -> linear(4*8*8 -> 10),
    plus a module it never calls."""

    def __init__(self, attention=False):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.fc = nn.Linear(4 * 8 * 8, 10)
        self.unused = nn.Linear(50, 50)
        self.attention = attention

    def predict(self, x):
        h = torch.relu(self.conv(x))
        out = {"cnn": self.fc(h.flatten(1))}
        if self.attention:  # 2 heads, 16 tokens of 4 channels attending to each other
            q = h.flatten(2).transpose(1, 2).reshape(1, 64, 2, 2)[:, :16].permute(0, 2, 1, 3)
            out["att"] = torch.nn.functional.scaled_dot_product_attention(q, q, q).flatten(1)
        return out


def test_exact_flops_and_parameters_of_a_known_network():
    method = _Tiny()
    gflops, params = inference_cost(method, 8, torch.device("cpu"))
    conv = 4 * 3 * 3 * 3 * 8 * 8  # multiply-adds: out channels x in channels x kernel x output positions
    linear = 256 * 10
    assert gflops * 1e9 == pytest.approx(conv + linear, abs=0.5)
    assert params == (4 * 3 * 9 + 4) + (256 * 10 + 10)  # weights and biases of the two called modules only
    assert method.training  # the mode is restored


def test_fused_attention_counts_both_matrix_products():
    without = inference_cost(_Tiny(), 8, torch.device("cpu"))[0]
    with_attention = inference_cost(_Tiny(attention=True), 8, torch.device("cpu"))[0]
    # batch 1 x 2 heads: (16 x 2) @ (2 x 16) and (16 x 16) @ (16 x 2) multiply-adds
    assert (with_attention - without) * 1e9 == pytest.approx(2 * 16 * 16 * (2 + 2), abs=0.5)
