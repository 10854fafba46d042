"""Residual adapters inserted before named backbone modules, one set per task, with per-task "others" heads.

The network of ACL (Zhang et al., MICCAI 2023) and DynaMMo (Qazi et al., MIUA 2024). Before every module named in
`layer_names` a forward pre-hook adds an adapter to the module's input:

    a(x) = alpha * ReLU(BN(ConvT3x3(ReLU(BN(Conv3x3_valid(x))))))        out = x + a(x),   alpha = 0.02 at start

(c -> c channels, biases on both convolutions: 18c^2 + 6c + 1 parameters; the valid convolution shrinks the map
by 2 px and the transposed one restores it, so each insertion point needs a map of at least 3 x 3 px).

`forward(x, paths)` runs the backbone once for a batch of *paths*: a path is a task index (that task's adapters)
or "merged" (the averaged adapters, when the network is built with `merged=True`). At the first insertion point
the batch is replicated once per path, at later points chunk i goes through path i's adapter, so the layers
before the first point run once and everything after it runs len(paths) times: ACL's T paths cost
stem + T * (rest + adapters), DynaMMo's single "merged" path costs stem + rest + adapters whatever T is.
"""
from __future__ import annotations

import contextlib
from typing import Sequence

import torch
from torch import nn

from utils.registry import UserError, closest

MERGED = "merged"


class Adapter(nn.Module):
    """x + alpha * ReLU(BN(ConvT3x3(ReLU(BN(Conv3x3 valid(x)))))) on c channels."""

    def __init__(self, channels: int, alpha: float = 0.02):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3)
        self.bn1 = nn.BatchNorm2d(channels)
        self.deconv = nn.ConvTranspose2d(channels, channels, 3)
        self.bn2 = nn.BatchNorm2d(channels)
        self.alpha = nn.Parameter(torch.tensor(float(alpha)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = torch.relu(self.bn1(self.conv(x)))
        return x + self.alpha * torch.relu(self.bn2(self.deconv(a)))


@torch.no_grad()
def average_into(target: nn.Module, sources: Sequence[nn.Module]) -> None:
    """Set every parameter and buffer of `target` to the uniform mean of the same entry over `sources`
    (BN running mean and variance included; integer counters are averaged and rounded down)."""
    states = [s.state_dict() for s in sources]
    for name, value in target.state_dict(keep_vars=True).items():
        mean = torch.stack([s[name].double() for s in states]).mean(0)
        value.copy_(mean.floor() if not value.is_floating_point() else mean)


@contextlib.contextmanager
def bn_recalibration(module: nn.Module):
    """Inside the block, forward passes of `module` in train mode re-estimate its BN running statistics as the
    plain average over the batches seen (momentum None), starting from scratch."""
    norms = [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None
    try:
        yield
    finally:
        for m, momentum in zip(norms, momenta):
            m.momentum = momentum


class AdapterNet(nn.Module):
    """A backbone with per-task adapters at `layer_names` and per-task heads Linear(D, n_t + 1), whose last
    output is "others" (a sample of another task). Inside a Method, frozen parts (no parameter requiring grad) run
    in eval mode."""

    def __init__(self, backbone: nn.Module, layer_names: Sequence[str], img_size: int, merged: bool = False):
        super().__init__()
        self.backbone, self.feature_dim = backbone, backbone.feature_dim
        self.layer_names = list(layer_names)
        channels = self._probe(img_size)
        self.adapters = nn.ModuleList(nn.ModuleList() for _ in channels)  # [point][task]
        self.merged = None
        if merged:  # overwritten by the first merge: initialised without advancing the global RNG, so that ACL
            # and DynaMMo runs of the same seed are identical up to the merge
            with torch.random.fork_rng(devices=[]):
                self.merged = nn.ModuleList(Adapter(c).requires_grad_(False) for c in channels)
        self.heads = nn.ModuleList()
        self.channels = channels
        self._paths: list | None = None
        for point, name in enumerate(self.layer_names):
            backbone.get_submodule(name).register_forward_pre_hook(self._hook(point))

    def _probe(self, img_size: int) -> list[int]:
        """Channels at each insertion point, checking names, execution order and feature-map size."""
        modules = dict(self.backbone.named_modules())
        for name in self.layer_names:
            if name not in modules or not name:
                raise UserError(f"layer_names: the backbone has no module '{name}'{closest(name, modules)}")
        seen: list[tuple[str, torch.Size]] = []
        hooks = [modules[n].register_forward_pre_hook(lambda m, a, n=n: seen.append((n, a[0].shape)))
                 for n in self.layer_names]
        was_training = self.backbone.training
        try:
            with torch.no_grad():
                self.backbone.eval()(torch.zeros(1, 3, img_size, img_size))
        finally:
            self.backbone.train(was_training)
            for h in hooks:
                h.remove()
        if [n for n, _ in seen] != self.layer_names:
            raise UserError(f"layer_names {self.layer_names} must name distinct modules, each called once, in the "
                            f"order the backbone runs them (it ran {[n for n, _ in seen]})")
        for name, shape in seen:
            if len(shape) != 4 or min(shape[2:]) < 3:
                raise UserError(f"layer_names: the input of '{name}' is {tuple(shape[1:])} at img_size {img_size}; "
                                "adapters need a feature map of at least 3x3 px: choose earlier layers or a larger "
                                "img_size")
        return [shape[1] for _, shape in seen]

    @property
    def n_tasks(self) -> int:
        return len(self.heads)

    def add_task(self, n_classes: int) -> None:
        """Adapters for a new task at every point, copied from the previous task's, and a head (n_classes + 1)."""
        device = next(self.backbone.parameters()).device
        for point, adapters in enumerate(self.adapters):
            adapter = Adapter(self.channels[point])
            if len(adapters):
                adapter.load_state_dict(adapters[-1].state_dict())
            adapters.append(adapter.to(device))
        self.heads.append(nn.Linear(self.feature_dim, n_classes + 1).to(device))

    def merge(self) -> None:
        """merged[point] = uniform average of the task adapters at that point (DynaMMo), computed once."""
        for merged, adapters in zip(self.merged, self.adapters):
            average_into(merged, list(adapters))

    def adapter(self, point: int, path) -> Adapter:
        return self.merged[point] if path == MERGED else self.adapters[point][path]

    def _hook(self, point: int):
        def hook(module, args):
            paths = self._paths
            if paths is None:  # plain backbone call
                return None
            x = args[0]
            chunks = [x] * len(paths) if point == 0 else x.chunk(len(paths))
            out = [self.adapter(point, p)(c) for p, c in zip(paths, chunks)]
            return (out[0] if len(out) == 1 else torch.cat(out), *args[1:])

        return hook

    def forward(self, x: torch.Tensor, paths: Sequence) -> torch.Tensor:
        """Features (len(paths), B, D): the backbone with each path's adapters."""
        self._paths = list(paths)
        try:
            features = self.backbone(x)
        finally:
            self._paths = None
        return features.view(len(paths), x.shape[0], -1)
