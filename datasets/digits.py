"""scikit-learn's bundled handwritten digits: the embedded default dataset, no download needed.

1797 grey 8x8 images of 10 digits (`sklearn.datasets.load_digits`), stored as uint8 (0-16 scaled to 0-255),
repeated to 3 channels, resized to `img_size` (default 32). The train/test split is fixed and stratified
(20% test, random_state 0), independent of the run's seed: 1437 train / 360 test images. Default tasks: 5 x 2
classes. No augmentation (flips and crops change a digit's meaning at 8 px). Mean/std are those of the data.
"""
import numpy as np

from datasets import DATASETS
from datasets.base import CLDataset, Splits, grey_digit_splits


@DATASETS.register("digits")
class Digits(CLDataset):
    n_classes = 10
    img_size = 32
    mean, std = (0.305,) * 3, (0.377,) * 3
    default_init_cls = default_increment = 2

    def load(self, root: str) -> Splits:
        from sklearn.datasets import load_digits

        digits = load_digits()
        return grey_digit_splits(np.round(digits.images * (255.0 / 16.0)).astype(np.uint8), digits.target)
