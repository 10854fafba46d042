"""The shared loops: what they draw from the global RNG, and the modes they leave modules in."""
import torch
from torch.utils.data import TensorDataset

from utils.train_loop import Engine


def test_inference_draws_nothing_from_the_global_rng():
    engine = Engine(torch.device("cpu"))
    data = TensorDataset(torch.randn(10, 3), torch.zeros(10, dtype=torch.long))
    module = torch.nn.Linear(3, 2)
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    out, y = engine.infer(module, data, module, batch_size=4)
    assert out.shape == (10, 2) and torch.equal(torch.rand(3), expected)


def test_inference_restores_every_module_mode():
    engine = Engine(torch.device("cpu"))
    net = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.BatchNorm1d(3))
    net.train()
    net[1].eval()  # a frozen part kept in eval mode by its method
    engine.infer(net, TensorDataset(torch.randn(4, 3), torch.zeros(4, dtype=torch.long)), net)
    assert net.training and net[0].training and not net[1].training
