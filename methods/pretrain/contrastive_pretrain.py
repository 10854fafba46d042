"""Self-supervised pretraining of a backbone on a dataset's training images (labels unused), written as a file that
`pretrain_path` loads: MoCo v2 (Chen, Fan, Girshick, He; arXiv 2003.04297, "Improved Baselines with Momentum
Contrastive Learning") and SimSiam (Chen & He, CVPR 2021, "Exploring Simple Siamese Representation Learning").
The original's `contrastive_pretrain` (method_type pretrain, `mode: moco_v2 | simsiam`, keys m, T, K).

Idea: two random augmentations ("views") of the same image should map to nearby representations. MoCo v2 makes
it a classification: the query q (view 1 through the backbone and a 2-layer MLP head) must pick out its key k
(view 2 through a slowly moving copy of the encoder) among K keys of earlier batches kept in a queue (InfoNCE,
temperature T; the copy follows the encoder with momentum m). SimSiam needs no negatives: a predictor MLP maps
one view's projection onto the other's, whose gradient is stopped, symmetrised (negative cosine). The networks
are in backbone/ssl_heads.py, the losses in utils/losses.py:

    moco_v2:  loss = info_nce(q(view1), k(view2), queue, T),   theta_k <- m theta_k + (1 - m) theta_q
    simsiam:  loss = ½ D(p1, sg(z2)) + ½ D(p2, sg(z1)),        D = −cos

Training is one `Stage` of the shared loop over a dataset yielding (view 1, view 2, label); the label is never
used. After it (`after_task`):
1. the backbone's BN running statistics are re-estimated on the un-augmented training images (`recalibrate_bn`),
   because every method that loads the file runs it in eval mode on un-augmented images;
2. the class means of the L2-normalised backbone features of the training set are computed, and `predict`
   returns "cnn" = −distance to them (a nearest-class-mean classifier), so the run's reported accuracy measures
   the feature quality (labels are used only here, for this report, never in training);
3. the backbone's state_dict is written, atomically, to `<run folder>/backbone_seed<S>.pth` and, when
   `save_path` is set, also there ({mode}, {dataset}, {backbone}, {seed} are filled in; a relative path is
   relative to the working directory, so `options/moco_v2/digits.yaml` writes
   `pretrained/moco_v2_digits_resnet32.pth`, which `options/<method>/digits_pretrained.yaml` reads). The file is
   read back into a fresh backbone before it is renamed into place, and its path is logged. The original saved
   only "every 100 epochs", through a condition that was never true, so a run wrote nothing.

Settings of the papers (the cifar100 configs carry them; the key defaults are MoCo v2's ImageNet recipe):
- MoCo v2: ResNet-50, head 2048 -> 2048 -> 128, T = 0.2, m = 0.999, K = 65536, SGD lr 0.03 for batch 256,
  momentum 0.9, weight decay 1e-4, cosine schedule, 200 epochs. Augmentation: RandomResizedCrop(224, scale
  0.2-1), colour jitter (0.4, 0.4, 0.4, 0.1) with p 0.8, grayscale p 0.2, Gaussian blur sigma 0.1-2.0 with
  p 0.5, horizontal flip.
- SimSiam: ImageNet: 3-layer projector (2048), predictor 2048 -> 512 -> 2048, SGD lr 0.05 x batch / 256,
  weight decay 1e-4, cosine, the MoCo v2 augmentation. CIFAR-10 (its appendix): ResNet-18 for 32 px,
  2-layer projector, batch 512, lr 0.03 x batch / 256, weight decay 5e-4, 800 epochs, no blur.

Deviations, and what is scaled for small images:
- Augmentation keys (`crop_scale`, `color_jitter`, `jitter_p`, `grayscale_p`, `blur_p`, `blur_sigma`, `hflip`)
  make the recipe adjustable. The crop goes straight to `img_size` (the dataset's own resize is not applied
  again). The blur kernel is ~10% of the image side (at least 3 px) and sigma is given in pixels of the output
  image, so the paper's 0.1-2.0 px at 224 px is ~0-0.3 px at 32 px: the 32-px configs turn blur off, as SimSiam
  does on CIFAR. For the 8-px digits: crops of 0.3-1 of the area (a crop of 0.2 of an 8-px digit is about
  3x3 px and loses the digit), no flips (a mirrored 2, 3 or 7 is not the same digit), blur off, and colour jitter
  reduced to brightness and contrast (the images are grey, so saturation, hue and grayscale change nothing).
- Shuffling BN, which MoCo needs against the "cheating" through batch statistics, exists only across GPUs; here
  the key batch is permuted and encoded in `shuffle_bn_splits` sub-batches with their own BN statistics.
- Head widths are keys (`proj_dim`, `pred_dim`, `proj_layers`) because a 64-d resnet32 feeding a 2048-wide
  SimSiam projector on 8-px images spends most of its compute in the heads; the digits configs narrow them.
- SimSiam keeps the predictor's learning rate fixed; the shared loop has one schedule for all parameters, so
  the predictor's decays too (the paper reports a small gain from fixing it, 68.1 against 67.7).
- K need not be a multiple of the batch size (the queue wraps around); the original required it.
- In a distributed run each rank enqueues its own share of the keys (no gather across ranks, unlike MoCo's
  multi-GPU code), so every rank's negatives are its own recent keys.
- After training, the BN statistics are re-estimated on clean images (step 1 above; `recalibrate_bn: false` keeps
  the running averages of training, which were taken on augmented views).
- False negatives of a queue near the dataset's size: options/moco_v2/digits.yaml keeps K = 1024 keys for 1437
  images (batch 64), so 26.8% of the queries (counted over its 100 epochs, seed 1993) find among their negatives
  the key of their own image from the previous epoch. No K ≥ 1 rules this out when every epoch is reshuffled (an
  image drawn last in one epoch and in the first batch of the next finds its key as the newest in the queue); the
  share grows about as K² / (2 · 1437²): 0.6% at K = 128, 2.0% at 256, 7.0% at 512, 26.8% at 1024. Measured with
  `python main.py --config options/moco_v2/digits.yaml [--K 128 --save_path /tmp/moco_v2_k128.pth]` (seed 1993;
  AMD EPYC CPU, one thread, float32 weights under bfloat16 autocast, native there; 6 to 14 min a run with the
  machine's load): the nearest-class-mean accuracy is 91.67% with K = 1024, 91.67% again when a throwaway copy
  of the loss removes the own-image keys from the negatives, and 93.89% with K = 128. The false negatives cost
  nothing measurable; the two points of K = 128 (8 of 360 test images, one seed) come with the smaller queue,
  not with them, and do not justify changing the backbone that the `digits_pretrained` configs load: the config
  keeps K = 1024.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
from torch.nn import functional as F
from torchvision import transforms as T

from backbone import build_backbone
from backbone.adapters import bn_recalibration
from backbone.pretrained import load_into, read_state_dict
from backbone.ssl_heads import MoCoNet, SimSiamNet
from datasets.base import Pool, seeded
from methods import register_method
from methods.base import Method
from utils import distributed
from utils.config import key
from utils.losses import info_nce, simsiam_loss
from utils.precision import upcast
from utils.registry import UserError
from utils.types import OptimConfig, Stage

log = logging.getLogger("cl")


@dataclass(frozen=True)
class ContrastivePretrainConfig:
    mode: str = key("moco_v2", "self-supervised objective", ("moco_v2", "simsiam"))
    m: float = key(0.999, "MoCo: momentum of the key encoder", range="[0, 1]")
    T: float = key(0.2, "MoCo: temperature of InfoNCE", range="(0, inf)")
    K: int = key(65536, "MoCo: keys in the queue (negatives)", range="[1, inf)")
    head_bn: bool = key(False, "MoCo: BN on the head's hidden layer (MoCo v3's head; MoCo v2 has none)")
    shuffle_bn_splits: int = key(4, "MoCo: sub-batches the key batch is encoded in (shuffling BN on one device)",
                                 range="[1, inf)")
    proj_dim: Optional[int] = key(None, "output width of the head (default: MoCo v2 128, SimSiam 2048)",
                                  range="[1, inf)")
    pred_dim: int = key(512, "SimSiam: hidden width of the predictor", range="[1, inf)")
    proj_layers: int = key(3, "SimSiam: Linear-BN layers of the projector (3 on ImageNet, 2 in its CIFAR runs)",
                           range="[1, inf)")
    crop_scale: list[float] = key([0.2, 1.0], "RandomResizedCrop: range of the crop's share of the image area",
                                   range="(0, 1]")
    color_jitter: list[float] = key([0.4, 0.4, 0.4, 0.1], "brightness, contrast, saturation, hue of the jitter",
                                     range="[0, inf)")
    jitter_p: float = key(0.8, "probability of the colour jitter", range="[0, 1]")
    grayscale_p: float = key(0.2, "probability of converting a view to grayscale", range="[0, 1]")
    blur_p: float = key(0.5, "probability of the Gaussian blur (0: none)", range="[0, 1]")
    blur_sigma: list[float] = key([0.1, 2.0], "range of the blur's sigma, in pixels of the output image",
                                   range="(0, inf)")
    hflip: bool = key(True, "random horizontal flips")
    recalibrate_bn: bool = key(True, "re-estimate the backbone's BN statistics on the un-augmented training "
                                     "images before writing it")
    save_path: Optional[str] = key(None, "also write the backbone weights to this file ({mode}, {dataset}, "
                                         "{backbone}, {seed} are filled in); always written to the run folder")


class TwoViewDataset(torch.utils.data.Dataset):
    """(view 1, view 2, label): two independent draws of `augment` (a per-image torchvision transform) of every
    image of `pool` at `indices`. An index may be (i, seed) to fix both draws (the engine's sampler does this)."""

    takes_seeds = True

    def __init__(self, pool: Pool, indices: np.ndarray, augment):
        self.pool, self.indices, self.augment = pool, np.asarray(indices), augment

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i):
        i, seed = i if isinstance(i, tuple) else (i, None)
        position = int(self.indices[i])
        image = self.pool.image(position)
        with seeded(seed):
            return self.augment(image), self.augment(image), int(self.pool.targets[position])


@register_method("contrastive_pretrain", config=ContrastivePretrainConfig, method_type="pretrain")
class ContrastivePretrain(Method):
    replay = "none"

    def __init__(self, cfg, data):
        if cfg.apply_nme:
            raise UserError("contrastive_pretrain reports a nearest-class-mean accuracy of its own; set apply_nme: "
                            "false")
        if cfg.freeze_fe:
            raise UserError("contrastive_pretrain trains the backbone; set freeze_fe: false")
        if cfg.save_path and len(cfg.seed) > 1 and "{seed}" not in cfg.save_path:
            raise UserError(f"save_path '{cfg.save_path}' would be overwritten by each of the {len(cfg.seed)} seeds; "
                            "put {seed} in it or run one seed")
        super().__init__(cfg, data)

    def build_network(self):
        backbone = self.make_backbone()
        if self.cfg.mode == "moco_v2":
            return MoCoNet(backbone, self.cfg.proj_dim or 128, self.cfg.K, self.cfg.head_bn)
        return SimSiamNet(backbone, self.cfg.proj_dim or 2048, self.cfg.pred_dim, self.cfg.proj_layers)

    # ---- data ----
    def augmentation(self) -> T.Compose:
        cfg, size = self.cfg, self.data.img_size
        steps = [T.RandomResizedCrop(size, scale=tuple(cfg.crop_scale), antialias=True)]
        if cfg.jitter_p > 0 and any(cfg.color_jitter):
            steps.append(T.RandomApply([T.ColorJitter(*cfg.color_jitter)], p=cfg.jitter_p))
        if cfg.grayscale_p > 0:
            steps.append(T.RandomGrayscale(p=cfg.grayscale_p))
        if cfg.blur_p > 0:
            kernel = max(3, int(0.1 * size) // 2 * 2 + 1)
            steps.append(T.RandomApply([T.GaussianBlur(kernel, sigma=tuple(cfg.blur_sigma))], p=cfg.blur_p))
        if cfg.hflip:
            steps.append(T.RandomHorizontalFlip())
        spec = self.data.spec
        return T.Compose([*steps, T.ToTensor(), T.Normalize(spec.mean, spec.std)])

    def two_view_data(self, task) -> TwoViewDataset:
        return TwoViewDataset(self.data.pool("train"), self.data.indices("train", task.classes), self.augmentation())

    # ---- training ----
    def stages(self, task, new_data, infer):
        return [Stage("pretrain", lambda: self.two_view_data(task), OptimConfig.from_config(self.cfg, True),
                      self.training_step)]

    def training_step(self, x1, x2, y):
        net = self.network
        if self.cfg.mode == "simsiam":
            z1, p1 = net.project_predict(x1)
            z2, p2 = net.project_predict(x2)
            return {"simsiam": simsiam_loss(p1, p2, z1, z2)}
        net.momentum_update(self.cfg.m)
        q = net.query(x1)
        k = net.keys(x2, self.cfg.shuffle_bn_splits)
        loss = info_nce(q, k, net.queue.clone(), self.cfg.T)
        net.enqueue(k)
        return {"info_nce": loss}

    # ---- after training: clean BN statistics, the feature-quality report, the file ----
    def after_task(self, task, infer):
        clean = self.data.dataset("train", self.data.indices("train", task.classes), augment=False)
        backbone = self.network.backbone
        if self.cfg.recalibrate_bn:
            def calibration_pass(x):
                backbone.train()  # batch statistics feed the running averages
                return backbone(x)

            with bn_recalibration(backbone):
                infer(calibration_pass, clean, self.network, whole=True)  # the same on every rank
        features = F.normalize(upcast(infer(self.network.features, clean, self.network)[0]), dim=1)
        labels = torch.as_tensor(clean.targets)
        means = torch.stack([features[labels == c].mean(0) for c in range(task.total)])
        self.class_means = F.normalize(means, dim=1).to(self.class_means.device)
        if distributed.is_main():  # one writer in a distributed run
            for path in self.output_paths():
                self.export(path)

    def output_paths(self) -> list[str]:
        """Where the backbone is written: the run folder (when the trainer gave one) and `save_path`."""
        cfg, paths = self.cfg, []
        run_dir = getattr(self, "run_dir", None)
        if run_dir:
            paths.append(os.path.join(run_dir, f"backbone_seed{self.data.seed}.pth"))
        if cfg.save_path:
            try:
                paths.append(cfg.save_path.format(mode=cfg.mode, dataset=cfg.dataset, backbone=cfg.backbone,
                                                  seed=self.data.seed))
            except (KeyError, IndexError, ValueError):
                raise UserError(f"save_path '{cfg.save_path}': only {{mode}}, {{dataset}}, {{backbone}} and {{seed}} "
                                "can be filled in") from None
        return paths

    def export(self, path: str) -> None:
        """Write the backbone's state_dict to `path` atomically, after checking that it loads into a fresh
        backbone of the same name."""
        folder = os.path.dirname(path)
        if folder:
            os.makedirs(folder, exist_ok=True)
        state = {k: v.detach().cpu().clone() for k, v in self.network.backbone.state_dict().items()}
        tmp = f"{path}.tmp"
        torch.save({"state_dict": state, "backbone": self.cfg.backbone, "mode": self.cfg.mode,
                    "dataset": self.cfg.dataset, "img_size": self.data.img_size, "seed": self.data.seed}, tmp)
        try:
            load_into(build_backbone(self.cfg.backbone), read_state_dict(tmp), tmp)
        except Exception:
            os.remove(tmp)
            raise
        os.replace(tmp, path)
        log.info(f"pretrained {self.cfg.backbone} backbone written to {path} (use it with pretrained: true, "
                 f"pretrain_path: {path})")

    def keeps_class_means(self) -> bool:
        return True  # the nearest-class-mean report

    def predict(self, x):
        """"cnn": −distance of the normalised backbone features to the class means (zeros before they exist)."""
        features = upcast(self.network.features(x))
        if not self.class_means.numel():
            return {"cnn": torch.zeros(len(x), self.task.total, device=x.device)}
        return {"cnn": -torch.cdist(F.normalize(features, dim=1), self.class_means)}
