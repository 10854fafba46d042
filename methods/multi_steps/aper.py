"""APER with adapters (Zhou, Cai, Ye, Zhan, Liu; "Revisiting Class-Incremental Learning with Pre-Trained Models:
Generalizability and Adaptivity are All You Need", IJCV 2024, arXiv 2303.07338; called ADAM in its first version).

Idea: SimpleCIL's prototypes are only as good as the pretrained features, which may not fit the target domain.
Adapt the network once, on the first task (adapters trained with a linear head by cross-entropy; the pretrained
weights stay frozen), then freeze it and classify every task, the first included, by cosine prototypes over the
concatenation of the pretrained and the adapted network's features, which keeps the generality of the one and
the fit of the other:

    task 0:   train the adapters A and a head W on D_0:   min CE(W f_A(x), y)
    every task, after it:   p_c = mean_{x in D_c} [f(x), f_A(x)]         (un-augmented training samples)
    predict:  argmax_c cos([f(x), f_A(x)], p_c)

Adapters (backbone/adapted.py): on a timm ViT (`layer_names: [blocks]`), AdaptFormer's parallel bottleneck beside
every block's MLP, bottleneck `adapter_bottleneck` (64, the authors' `ffn_num`), scale 0.1, as the paper; on a CNN
the residual adapters of ACL (backbone/adapters.py) before `layer_names`, our choice for CNNs (the paper adapts ViTs
and ResNets by full fine-tuning, prompts, SSF or AdaptFormer; adapters keep the frozen copy and the adapted copy in
one set of weights). The first task trains with the `init_*` optimiser keys (the authors' `tuned_epoch`,
`init_lr`; here init_epochs, init_lrate); later tasks train nothing (no stage runs).

Deviations: the two networks share the frozen backbone and differ only by the adapters (the authors keep two copies
of the ViT; the features are the same). The training head is a cosine classifier with a learnt scale, as the
authors' (scale-free: a frozen random CNN's features have norms in the hundreds, which a linear head at the
common learning rate turned into NaN on digits); it is discarded after the first task, as theirs.
"""
from __future__ import annotations

from dataclasses import dataclass

from backbone.adapted import AdaptedNet
from methods import register_method
from methods.multi_steps.simplecil import SimpleCIL
from utils.config import key
from utils.losses import bounded_ce
from utils.types import OptimConfig, Stage


@dataclass(frozen=True)
class APERConfig:
    layer_names: list[str] = key(["blocks"], "where the first task's adapters go: [blocks] = a parallel adapter in "
                                             "every block of a timm ViT; on a CNN, the modules before which a "
                                             "residual adapter goes (efficientnet_lite0: blocks.2 .3 .5 .6; "
                                             "resnet32: stage_1..stage_3)")
    adapter_bottleneck: int = key(64, "a ViT adapter's bottleneck width (AdaptFormer; APER's ffn_num)",
                                  range="[1, inf)")


@register_method("aper", config=APERConfig)
class APER(SimpleCIL):
    use = "both"

    def build_network(self):
        return AdaptedNet(self.make_backbone(), self.make_head, self.use, self.cfg.layer_names, self.data.img_size,
                          self.cfg.adapter_bottleneck)

    def stages(self, task, new_data, infer):
        """The first task trains the adapters and the training head on its data; later tasks train nothing."""
        if not task.is_first:
            return []
        return [Stage("adapt", lambda: new_data, OptimConfig.from_config(self.cfg, first_task=True),
                      self.adapt_step, trains=lambda: [self.network.adapters, self.network.fc])]

    def adapt_step(self, x, y):
        return {"ce": bounded_ce(self.network.adapted_logits(x), y, 0, self.task.total)}
