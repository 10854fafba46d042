"""Inference cost of a method as it is used at test time: fvcore GFLOPs and the parameters it touches.

GFLOPs are fvcore's count, in which one fused multiply-add counts as one FLOP (i.e. GMACs; resnet18 at 224 px
is about 1.82). The traced forward is `method.predict`, the very call evaluation makes, so every branch of a
multi-branch model is counted. Parameters are those of the modules that forward actually calls (a frozen
teacher kept for distillation, say, is not counted).
"""
from __future__ import annotations

import logging
import warnings

import torch
from torch import nn

from utils.modes import eval_mode

with warnings.catch_warnings():
    warnings.simplefilter("ignore", FutureWarning)  # fvcore scripts a loss with the deprecated torch.jit at import
    from fvcore.nn import FlopCountAnalysis


class _Predict(nn.Module):
    """Traces `method.predict`."""

    def __init__(self, method):
        super().__init__()
        self.method = method

    def forward(self, x):
        return tuple(self.method.predict(x).values())


def _sdpa_flops(inputs, outputs) -> int:
    """Fused attention softmax(Q K^T) V: (L x D) by (D x S) plus (L x S) by (S x Dv) multiply-adds per head."""
    from fvcore.nn.jit_handles import get_shape

    q, k, v = (get_shape(t) for t in inputs[:3])
    batch = 1
    for d in q[:-2]:
        batch *= d
    return batch * q[-2] * k[-2] * (q[-1] + v[-1])


def inference_cost(method, img_size: int, device: torch.device) -> tuple[float, int]:
    """(GFLOPs per image, parameter count) of `method.predict` on one img_size x img_size image."""
    x = torch.zeros(1, 3, img_size, img_size, device=device)
    called: dict[int, nn.Module] = {}

    def record(module, *_):
        called[id(module)] = module

    with eval_mode(method):
        hooks = [m.register_forward_hook(record) for m in method.modules()]
        with torch.no_grad():
            method.predict(x)
        for h in hooks:
            h.remove()
        # modules whose forward ran, and the modules holding them (a ViT's pos_embed belongs to the model, whose
        # blocks a wrapper may call directly)
        names = {id(m): name for name, m in method.named_modules()}
        modules = dict(method.named_modules())
        used = {names[i] for i in called if i in names}
        used |= {name.rsplit(".", k)[0] for name in used for k in range(1, name.count(".") + 1)} | {""}
        params = {id(p): p.numel() for name in used for p in modules[name].parameters(recurse=False)}
        fvcore_log = logging.getLogger("fvcore")
        level, fvcore_log.level = fvcore_log.level, logging.ERROR
        try:
            analysis = FlopCountAnalysis(_Predict(method), x)
            analysis.unsupported_ops_warnings(False).uncalled_modules_warnings(False).tracer_warnings("none")
            analysis.set_op_handle("aten::scaled_dot_product_attention", _sdpa_flops)
            with torch.no_grad(), warnings.catch_warnings():
                warnings.simplefilter("ignore")  # tracer and deprecation noise from torch.jit
                flops = analysis.total()
        finally:
            fvcore_log.level = level
    return flops / 1e9, sum(params.values())


class InferenceCost:
    """`inference_cost`, counted again only when what it depends on changed: the image size, the seen classes and
    the shape of every parameter and buffer of the method (a new head, branch or adapter set)."""

    def __init__(self):
        self.key, self.value = None, None

    def __call__(self, method, img_size: int, device: torch.device) -> tuple[float, int]:
        key = (img_size, getattr(method.task, "total", None),
               tuple((name, tuple(t.shape)) for name, t in method.state_dict().items()))
        if key != self.key:
            self.key, self.value = key, inference_cost(method, img_size, device)
        return self.value
