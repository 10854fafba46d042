"""Worker of tests/test_distributed.py: trains a small BN network with the engine on one rank of a gloo group."""
import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv2d(3, 4, 3, padding=1)
        self.bn = torch.nn.BatchNorm2d(4)
        self.fc = torch.nn.Linear(4, 3)

    def forward(self, x):
        return self.fc(torch.relu(self.bn(self.conv(x))).mean((2, 3)))


class Method(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.network = Net()

    def before_optimizer_step(self):
        pass

    def step(self, x, y):
        return {"ce": torch.nn.functional.cross_entropy(self.network(x), y)}


def train(out: str, sync_bn: bool) -> None:
    from trainer.engine.engine import Engine
    from utils.types import OptimConfig, Stage, Task

    torch.set_num_threads(1)
    generator = torch.Generator().manual_seed(1)
    data = torch.utils.data.TensorDataset(torch.randn(43, 3, 6, 6, generator=generator),
                                          torch.randint(0, 3, (43,), generator=generator))
    method = Method()
    engine = Engine(torch.device("cpu"), channels_last=True, seed=3, sync_bn=sync_bn)
    stage = Stage("train", lambda: data, OptimConfig(epochs=2, lrate=0.1, batch_size=8, opt_mom=0.9), method.step)
    losses = engine.fit(method, Task(0, 0, 3, 1), stage)
    features, y = engine.infer(lambda x: method.network(x), data, method, batch_size=6)
    if engine.rank == 0:
        torch.save({"state": method.state_dict(), "losses": losses, "outputs": features, "targets": y}, out)


if __name__ == "__main__":
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        dist.init_process_group("gloo")
    train(sys.argv[1], sys.argv[2] == "sync")
    if dist.is_initialized():
        dist.destroy_process_group()
