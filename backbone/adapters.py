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

Merging (DynaMMo; `merge_vectors` on the flattened parameters of each task's whole adapter set, every point):
theta_t are task t's adapter parameters, the reference point is the first task's, theta_0, and the task vectors
are tau_t = theta_t - theta_0 for t >= 1 (so that mean = theta_0 + (1/T) sum_t tau_t):

    mean              theta = (1/T) sum_{t=0}^{T-1} theta_t                      (DynaMMo, the paper's)
    task_arithmetic   theta = theta_0 + lambda sum_t tau_t                       (Ilharco et al., ICLR 2023)
    ties              theta = theta_0 + lambda tau_m,  tau_m^p = mean over {t : tau'_t^p != 0, sgn tau'_t^p = g^p}
                      of tau'_t^p, where tau'_t keeps the `keep` share of tau_t's entries of largest magnitude
                      (trim), g = sgn(sum_t tau'_t) (elect sign), 0 where no task agrees (Yadav et al., NeurIPS 2023)
    magmax            theta = theta_0 + lambda tau_{k(p)}^p,  k(p) = argmax_t |tau_t^p|   (Marczak et al., ECCV 2024)

Why the first task's adapters and not the initialisation as the reference point: the initialisation is a random
draw that no task ever used, whereas theta_0 is a trained, working adapter set; without pretrained weights the
backbone itself learns together with theta_0 (ACL trains it in the first task and freezes it after), so theta_0 is
the "pretrained model" the later adapters are fine-tuned from, exactly the setting of task vectors; with
`adapter_init: first` every later task literally starts from theta_0 (ACMap, arXiv 2412.18219). It is stored
anyway (the task adapters are kept), and after the first task every strategy returns theta_0 itself.
BN running statistics are not weights: every strategy averages them (or DynaMMo re-estimates them).
"""
from __future__ import annotations

import contextlib
from typing import Sequence

import torch
from torch import nn

from backbone.network import Network
from utils.modes import eval_mode
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


MERGE_STRATEGIES = ("mean", "task_arithmetic", "ties", "magmax")


def merge_vectors(thetas: torch.Tensor, strategy: str = "mean", lam: float = 1.0, keep: float = 0.2) -> torch.Tensor:
    """Merge the (T, N) flattened parameters of T task adapter sets into one (N,) vector by `strategy` (formulas in
    the module docstring; the first row is the reference point theta_0). `lam` scales the merged task vector
    (ignored by mean), `keep` is TIES's share of each task vector's entries kept after trimming."""
    if strategy not in MERGE_STRATEGIES:
        raise UserError(f"merge_strategy '{strategy}' is not one of {', '.join(MERGE_STRATEGIES)}"
                        f"{closest(strategy, MERGE_STRATEGIES)}")
    if strategy == "mean":
        return thetas.mean(0)
    reference, taus = thetas[0], thetas[1:] - thetas[0]
    if len(taus) == 0:
        return reference.clone()
    if strategy == "task_arithmetic":
        return reference + lam * taus.sum(0)
    if strategy == "magmax":
        pick = taus.abs().argmax(0, keepdim=True)
        return reference + lam * taus.gather(0, pick)[0]
    n_keep = max(1, int(round(keep * taus.shape[1])))  # ties: trim, elect sign, disjoint mean
    threshold = taus.abs().topk(n_keep, dim=1).values[:, -1:]
    trimmed = torch.where(taus.abs() >= threshold, taus, torch.zeros_like(taus))
    sign = torch.sign(trimmed.sum(0))
    agree = (torch.sign(trimmed) == sign) & (trimmed != 0)
    tau = (trimmed * agree).sum(0) / agree.sum(0).clamp(min=1)
    return reference + lam * tau


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


def probe_channels(backbone: nn.Module, layer_names: list[str], img_size: int) -> list[int]:
    """Channels at the input of each module of `layer_names` (adapters' insertion points), checking names, execution
    order and feature-map size (a one-line UserError otherwise)."""
    modules = dict(backbone.named_modules())
    for name in layer_names:
        if name not in modules or not name:
            raise UserError(f"layer_names: the backbone has no module '{name}'{closest(name, modules)}")
    seen: list[tuple[str, torch.Size]] = []
    hooks = [modules[n].register_forward_pre_hook(lambda m, a, n=n: seen.append((n, a[0].shape)))
             for n in layer_names]
    try:
        with torch.no_grad(), eval_mode(backbone):
            backbone(torch.zeros(1, 3, img_size, img_size))
    finally:
        for h in hooks:
            h.remove()
    if [n for n, _ in seen] != layer_names:
        raise UserError(f"layer_names {layer_names} must name distinct modules, each called once, in the "
                        f"order the backbone runs them (it ran {[n for n, _ in seen]})")
    for name, shape in seen:
        if len(shape) != 4 or min(shape[2:]) < 3:
            raise UserError(f"layer_names: the input of '{name}' is {tuple(shape[1:])} at img_size {img_size}; "
                            "adapters need a feature map of at least 3x3 px: choose earlier layers or a larger "
                            "img_size")
    return [shape[1] for _, shape in seen]


class AdapterNet(Network):
    """A backbone with per-task adapters at `layer_names` and per-task heads Linear(D, n_t + 1), whose last
    output is "others" (a sample of another task). `forward(x)` and `features(x)` run the newest task's path
    (what its training and exemplar selection use); `forward_paths(x, paths)` runs several. A new task's
    adapters start as a copy of the previous task's (`adapter_init` "previous") or of the first task's ("first");
    the adapters and heads of earlier tasks are frozen (and so, inside a Method, run in eval mode)."""

    def __init__(self, backbone: nn.Module, layer_names: Sequence[str], img_size: int, merged: bool = False,
                 adapter_init: str = "previous"):
        super().__init__(backbone)
        self.layer_names, self.adapter_init = list(layer_names), adapter_init
        channels = probe_channels(backbone, self.layer_names, img_size)
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


    @property
    def n_tasks(self) -> int:
        return len(self.heads)

    @property
    def n_classes(self) -> int:
        return sum(head.out_features - 1 for head in self.heads)

    def expand_head(self, n_classes: int) -> None:
        """A new task of classes [n_classes so far, n_classes): adapters at every point, copied from the previous
        (or the first) task's, and a head of its classes plus "others"; earlier adapters and heads are frozen."""
        added = n_classes - self.n_classes
        if added <= 0:
            return
        self.adapters.requires_grad_(False)
        self.heads.requires_grad_(False)
        device = next(self.backbone.parameters()).device
        for point, adapters in enumerate(self.adapters):
            adapter = Adapter(self.channels[point])
            if len(adapters):
                adapter.load_state_dict(adapters[-1 if self.adapter_init == "previous" else 0].state_dict())
            adapters.append(adapter.to(device))
        self.heads.append(nn.Linear(self.feature_dim, added + 1).to(device))

    def task_set(self, task: int) -> nn.ModuleList:
        """Task `task`'s adapters at every point, as one module (its parameters in the order of `merged`'s)."""
        return nn.ModuleList(adapters[task] for adapters in self.adapters)

    @torch.no_grad()
    def merge(self, strategy: str = "mean", lam: float = 1.0, keep: float = 0.2, alpha: str = "strategy") -> None:
        """Set the merged adapters from the task adapters, computed once (DynaMMo): the parameters by
        `merge_vectors(strategy, lam, keep)` over each task's whole adapter set; the BN running statistics
        averaged; every alpha merged like the other parameters (`alpha` "strategy") or taken from the newest
        task ("newest")."""
        sets = [self.task_set(t) for t in range(len(self.adapters[0]))]
        thetas = torch.stack([torch.cat([p.double().reshape(-1) for p in s.parameters()]) for s in sets])  # any layout
        merged = merge_vectors(thetas, strategy, lam, keep)
        offset = 0
        for p in self.merged.parameters():
            p.copy_(merged[offset: offset + p.numel()].view_as(p))
            offset += p.numel()
        for merged_adapter, adapters in zip(self.merged, self.adapters):
            for name, buffer in merged_adapter.named_buffers():
                mean = torch.stack([a.get_buffer(name).double() for a in adapters]).mean(0)
                buffer.copy_(mean if buffer.is_floating_point() else mean.floor())
            if alpha == "newest":
                merged_adapter.alpha.copy_(adapters[-1].alpha)

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

    def forward_paths(self, x: torch.Tensor, paths: Sequence) -> torch.Tensor:
        """Features (len(paths), B, D): the backbone with each path's adapters."""
        self._paths = list(paths)
        try:
            features = self.backbone(x)
        finally:
            self._paths = None
        return features.view(len(paths), x.shape[0], -1)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The newest task's path."""
        return self.forward_paths(x, [self.n_tasks - 1])[0]

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """The newest task's path and head (its last column: "others")."""
        features = self.features(x)
        return {"features": features, "logits": self.heads[-1](features)}
