"""ImageNet-R (Hendrycks et al., ICCV 2021): renditions (art, cartoons, sketches, ...) of 200 ImageNet classes,
about 30k images.

Read from `<root>/imagenet_r/{train,test}/<wnid>/` when the user has split it, otherwise from the distributed
folder `<root>/imagenet-r/<wnid>/` with a deterministic 80/20 split per class (the protocol of L2P/DualPrompt/
CODA-Prompt): the images of a class are ordered by the SHA-1 of their file name and the first 20% (at least one)
are the test split. The split needs no seed, so it is the same for every run, seed and machine, and adding or
removing an image moves no other image between the splits. Deviation from the original: it needed a
pre-split copy and shipped no split. Class ids are the sorted wnids. Transforms as in the original: horizontal
flip + brightness jitter 63/255 (no crop), its own normalisation; default 20 classes per task.
"""
import os

from torchvision import transforms as T

from datasets import DATASETS
from datasets._common import IMAGENET_R_NORM, DiskDataset, held_out, splits, stable_order


@DATASETS.register("imagenet_r")
class ImageNetR(DiskDataset):
    n_classes = 200
    img_size = 224
    mean, std = IMAGENET_R_NORM
    default_init_cls = default_increment = 20
    layout = "imagenet_r/{train,test}/<wnid>/<images> (pre-split) or imagenet-r/<wnid>/<images> (as distributed)"
    test_fraction = 0.2

    def load(self, root):
        if os.path.isdir(os.path.join(root, "imagenet_r")):
            return splits(*self.folder_split(os.path.join(root, "imagenet_r"), root, expected=self.n_classes))
        base = os.path.join(root, "imagenet-r")
        wnids = self.class_folders(base, self.n_classes)
        train, test = ([], []), ([], [])
        for label, wnid in enumerate(wnids):
            files = self.image_files(os.path.join(base, wnid), root)
            if len(files) < 2:
                raise self.fail(f"class folder '{os.path.join(base, wnid)}' needs at least 2 images to split")
            ordered = stable_order([os.path.relpath(f, base) for f in files])
            n_test = held_out(len(files), self.test_fraction, 1.0)
            for i, rel in enumerate(ordered):
                part = test if i < n_test else train
                part[0].append(os.path.join(base, rel))
                part[1].append(label)
        return splits(train, test, wnids)

    def train_augment(self):
        return [T.RandomHorizontalFlip(), T.ColorJitter(brightness=63 / 255)]
