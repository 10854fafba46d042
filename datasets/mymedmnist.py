"""MyMedMNIST (the original's MedMNIST benchmark): four MedMNIST subsets as four tasks, 36 classes.

BloodMNIST (8) + OrganAMNIST (11) + PathMNIST (9) + TissueMNIST (8), one task per subset in that order; with
`shuffle: true` the DataManager shuffles the subset order by the seed (classes keep their order inside a subset),
and init_cls/increment are ignored. Labels are offset by the class counts of the subsets before them.

Files as for the single subsets (datasets/medmnist2d.py): `<root>/medmnist/<flag>.npz` or `<flag>_<size>.npz`;
the organ subset may use its MedMNIST v1 name `organmnist_axial` (the original's) or the v2 name `organamnist`.
All four must have the same image size. Official train/test splits; grayscale repeated to 3 channels.
Transforms as in the original: RandomCrop + horizontal flip, CIFAR-100 normalisation (the 32-px crop on 28-px
images is fixed as in medmnist2d). The original flips every image, organs included, although OrganAMNIST has
left/right classes; we keep its flip so that results stay comparable with the published ones. Deviation: the
original claimed a validation split it never loaded; there is none here.
"""
import numpy as np
from medmnist import INFO

from datasets import DATASETS
from datasets.base import Splits
from datasets.medmnist2d import MedMNISTBase

#: (flag, other accepted file names) in the original's order
SUBSETS = (("bloodmnist", ()), ("organamnist", ("organmnist_axial",)), ("pathmnist", ()), ("tissuemnist", ()))


@DATASETS.register("mymedmnist")
class MyMedMNIST(MedMNISTBase):
    task_groups = [len(INFO[flag]["label"]) for flag, _ in SUBSETS]
    n_classes = sum(task_groups)
    layout = ("medmnist/{bloodmnist, organamnist (or organmnist_axial), pathmnist, tissuemnist}.npz, or "
              "<flag>_<size>.npz of one size")

    def load(self, root):
        parts, names, offset = [], [], 0
        for (flag, aliases), n in zip(SUBSETS, self.task_groups):
            path = self.npz_file(root, (flag, *aliases))
            train_x, train_y, test_x, test_y = self.read_npz(path, n)
            if parts and train_x.shape[1:] != parts[0][0].shape[1:]:
                raise self.fail(f"'{path}' holds {train_x.shape[1]}-px images, the other subsets "
                                f"{parts[0][0].shape[1]}-px; use files of one size")
            parts.append((train_x, train_y + offset, test_x, test_y + offset))
            names += [f"{flag}/{INFO[flag]['label'][str(i)]}" for i in range(n)]
            offset += n
        train_x, train_y, test_x, test_y = (np.concatenate(arrays) for arrays in zip(*parts))
        self.img_size = train_x.shape[1]
        return Splits(train_x, train_y, test_x, test_y, names)
