"""Train and eval mode for the length of a block: every submodule gets its own mode back afterwards (a Method
keeps frozen parts in eval mode while it trains, so one flag for the whole module would not restore it)."""
from __future__ import annotations

import contextlib

from torch import nn


@contextlib.contextmanager
def _mode(module: nn.Module, training: bool):
    modes = [(m, m.training) for m in module.modules()]
    module.train(training)
    try:
        yield module
    finally:
        for m, mode in modes:
            m.training = mode


def eval_mode(module: nn.Module):
    """`with eval_mode(net):` runs net (dropout off, BN on its running statistics); modes restored after."""
    return _mode(module, False)


def train_mode(module: nn.Module):
    """`with train_mode(net):` runs net in train mode (BN on batch statistics); modes restored after."""
    return _mode(module, True)
