"""Skin23: DermNet (dermnet.com images, as on Kaggle), 23 skin-disease categories.

Read from `<root>/skin23/{train,test}/<class>/<images>`. Deviation from the original: it numbered the classes
from the unsorted `os.listdir` of each split separately, so train and test labels could disagree; here one class
map, from the sorted train folders, serves both splits, and the test folders must hold the same classes.
Transforms as in the original: horizontal flip, the skin normalisation, 224 px. Default tasks: 3 classes, then
5 per task (the original shipped no config for it).
"""
import os

from datasets import DATASETS
from datasets._common import SkinDataset, splits


@DATASETS.register("skin23")
class Skin23(SkinDataset):
    n_classes = 23
    default_init_cls, default_increment = 3, 5
    folder = "skin23"
    layout = "skin23/{train,test}/<class>/<images>"

    def load(self, root):
        return splits(*self.folder_split(os.path.join(root, self.folder), root, expected=self.n_classes))
