"""Method registry. `methods/{multi_steps,single_step,pretrain}/<name>.py` register with `register_method`;
every module is imported automatically, so dropping a file in registers it."""
import dataclasses

from utils.config import GlobalConfig
from utils.registry import Registry, UserError, import_submodules

METHODS = Registry("method")
METHOD_TYPES = ("multi_steps", "single_step", "pretrain")


def register_method(name: str, config=None, method_type: str = "multi_steps"):
    """Register a Method subclass under `name`, with the frozen dataclass declaring its own config keys (or None;
    a key may not shadow a global key). `method_type`: multi_steps (task by task), single_step (one task holding
    every class), pretrain."""
    assert method_type in METHOD_TYPES, method_type
    if config is not None:
        if not (dataclasses.is_dataclass(config) and config.__dataclass_params__.frozen):
            raise TypeError(f"method '{name}': its config {config.__name__} must be a @dataclass(frozen=True)")
        shadowed = sorted(set(config.__dataclass_fields__) & set(GlobalConfig.__dataclass_fields__))
        if shadowed:
            raise TypeError(f"method '{name}': its key '{shadowed[0]}' shadows the global key of that name; "
                            "give it another name")

    def decorator(cls):
        return METHODS.register(name, config=config, method_type=method_type)(cls)

    return decorator


def method_config(name: str):
    """The config dataclass of method `name` (None when it declares no keys of its own)."""
    return METHODS.meta(name)["config"]


def build_method(cfg, data):
    meta = METHODS.meta(cfg.method)
    if cfg.method_type and cfg.method_type != meta["method_type"]:
        raise UserError(f"method '{cfg.method}' is a {meta['method_type']} method, but the config says "
                        f"method_type: {cfg.method_type}")
    return METHODS.get(cfg.method)(cfg, data)


import_submodules(__name__, __path__)
