"""Dataset registry: every module in this package registers its dataset class by name (drop a file in)."""
from utils.registry import Registry, import_submodules

DATASETS = Registry("dataset")

import_submodules(__name__, __path__, skip=("check",))  # check.py is the folder-checking command
