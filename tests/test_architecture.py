"""The layering of docs/architecture.md, checked on the source: no import from a lower layer to a higher one, the
engine below the rest of the trainer, utils/ holding only what the lower layers use, and no method importing
another method's module unless it subclasses a class of it."""
import ast
import glob
import os

import pytest

from conftest import ROOT

#: rank of each package; a module may import its own package and packages of a lower rank only
LAYERS = {"utils": 0, "backbone": 1, "datasets": 1, "methods": 2, "trainer": 3}


def imported_modules(path: str) -> list[tuple[str, int]]:
    """(module name, line) of every absolute import in a file, also those inside functions."""
    found = []
    for node in ast.walk(ast.parse(open(path).read(), path)):
        if isinstance(node, ast.Import):
            found += [(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append((node.module, node.lineno))
    return found


def package_files():
    return sorted(p for package in LAYERS for p in glob.glob(os.path.join(ROOT, package, "**", "*.py"),
                                                             recursive=True))


@pytest.mark.parametrize("path", package_files(), ids=lambda p: os.path.relpath(p, ROOT))
def test_no_import_reaches_up_or_sideways(path):
    own = os.path.relpath(path, ROOT).split(os.sep)[0]
    for module, line in imported_modules(path):
        top = module.split(".")[0]
        if top in LAYERS and top != own:
            assert LAYERS[top] < LAYERS[own], f"{os.path.relpath(path, ROOT)}:{line} imports {module}"


ENGINE_FILES = sorted(glob.glob(os.path.join(ROOT, "trainer", "engine", "*.py")))


@pytest.mark.parametrize("path", ENGINE_FILES, ids=lambda p: os.path.relpath(p, ROOT))
def test_the_engine_is_below_the_rest_of_the_trainer(path):
    """The loops know nothing of runs, results, checkpoints or evaluation: from trainer/ they import only the
    engine's own modules and the RNG state (trainer/seed.py)."""
    for module, line in imported_modules(path):
        if module.split(".")[0] == "trainer":
            assert module.startswith("trainer.engine") or module == "trainer.seed", \
                f"{os.path.relpath(path, ROOT)}:{line} imports {module}"


def test_utils_holds_only_what_the_lower_layers_import():
    """utils/ is the ground floor of backbone/, datasets/ and methods/; what only the trainer uses lives there."""
    used = set()
    for package in ("backbone", "datasets", "methods"):
        for path in glob.glob(os.path.join(ROOT, package, "**", "*.py"), recursive=True):
            for node in ast.walk(ast.parse(open(path).read(), path)):
                if isinstance(node, ast.ImportFrom) and node.module == "utils":  # from utils import distributed
                    used |= {f"utils.{alias.name}" for alias in node.names}
                elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("utils."):
                    used.add(node.module)
                elif isinstance(node, ast.Import):
                    used |= {alias.name for alias in node.names if alias.name.startswith("utils.")}
    own = {"utils." + os.path.splitext(os.path.basename(p))[0] for p in glob.glob(os.path.join(ROOT, "utils", "*.py"))}
    unused = sorted(own - used - {"utils.__init__"})
    assert not unused, f"imported by no module of backbone/, datasets/ or methods/ (they belong in trainer/): {unused}"


def test_the_checker_sees_a_violation(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("def f():\n    from methods.base import Method\n")
    assert imported_modules(str(bad)) == [("methods.base", 2)]


METHOD_FILES = sorted(glob.glob(os.path.join(ROOT, "methods", "*", "*.py")))


@pytest.mark.parametrize("path", [p for p in METHOD_FILES if not p.endswith("__init__.py")],
                         ids=lambda p: os.path.relpath(p, ROOT))
def test_methods_import_only_the_method_they_subclass(path):
    tree = ast.parse(open(path).read(), path)
    imported = {}  # name -> module, for names imported from other method modules
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("methods."):
            if node.module != "methods.base":
                imported.update({a.asname or a.name: node.module for a in node.names})
    bases = {b.id for node in ast.walk(tree) if isinstance(node, ast.ClassDef) for b in node.bases
             if isinstance(b, ast.Name)}
    for name, module in imported.items():
        assert name in bases, f"{os.path.relpath(path, ROOT)} imports {name} from {module}"
