"""Reconstruction methods: ``FaceReconMethod`` subclasses registered by name.

A method module registers its class with ``@register("name")``; ``facelab train method=name``
finds it through ``get_method``. Methods never import one another.
"""

from __future__ import annotations

import importlib
import importlib.util
from typing import Callable, TypeVar

T = TypeVar("T")
_REGISTRY: dict[str, type] = {}
# Methods that have a config in conf/method/ and the issue that delivers their implementation.
PLANNED = {
    "specular": "the specular method issue (#5)",
    "cest": "its method issue",
    "gcn": "its method issue",
    "inversefacenet": "its method issue",
    "multilevel": "its method issue",
}


class MethodNotAvailableError(LookupError):
    """A configured method whose implementation has not landed."""


def register(name: str) -> Callable[[type[T]], type[T]]:
    """Class decorator: make a method available to ``facelab train method=<name>``."""

    def decorate(cls: type[T]) -> type[T]:
        if name in _REGISTRY and _REGISTRY[name] is not cls:
            raise ValueError(f"method {name!r} is registered twice ({_REGISTRY[name].__name__}, {cls.__name__})")
        _REGISTRY[name] = cls
        return cls

    return decorate


def available() -> list[str]:
    """Names of the methods that can be trained now."""
    for name in PLANNED:
        _import(name)
    return sorted(_REGISTRY)


def _import(name: str) -> None:
    """Import a method's module (which registers it) when it exists."""
    if name not in _REGISTRY and importlib.util.find_spec(f"{__name__}.{name}") is not None:
        importlib.import_module(f"{__name__}.{name}")


def get_method(name: str) -> type:
    """The registered class for `name`; MethodNotAvailableError says plainly when it has not landed."""
    if name in PLANNED:
        _import(name)
    if name in _REGISTRY:
        return _REGISTRY[name]
    ready = ", ".join(available()) or "none yet"
    if name in PLANNED:
        raise MethodNotAvailableError(
            f"method {name!r} is not available yet: it lands with {PLANNED[name]}. Available methods: {ready}.")
    raise MethodNotAvailableError(f"unknown method {name!r}. Available methods: {ready}.")


_MISSING = object()


class CheckpointError(ValueError):
    """A file that is not a facelab checkpoint, or one this installation cannot rebuild."""


def load_method(path: str, device: str = "cpu", overrides: dict | None = None):
    """Rebuild a trained method from a checkpoint written by ``facelab train``, in eval mode.

    The run's config travels in the checkpoint (its hyperparameters), so the face model, the
    crop size and the method's options come back as they were trained; an option added to the
    method since then takes its current default; a run rendered with nvdiffrast renders with the
    PyTorch backend off CUDA. overrides: dotted config keys that the run config has, set before
    the method is built (e.g. {"method.expression_activation": "linear"})."""
    from pathlib import Path

    import torch
    from omegaconf import OmegaConf

    file = Path(path)
    if not file.is_file():
        raise CheckpointError(f"{file}: no such checkpoint (runs write runs/<name>/checkpoints/last.ckpt)")
    try:
        checkpoint = torch.load(file, map_location="cpu", weights_only=False)
    except Exception as error:  # a truncated or foreign file: say which, not the unpickler's detail
        raise CheckpointError(f"{file}: not a readable PyTorch checkpoint ({type(error).__name__}: {error})") from error
    config = (checkpoint.get("hyper_parameters") or {}).get("config") if isinstance(checkpoint, dict) else None
    if not config or "state_dict" not in checkpoint:
        raise CheckpointError(f"{file}: not a facelab checkpoint (no run config or state_dict); "
                              "pass a .ckpt written by `facelab train`")
    cfg = _with_current_defaults(OmegaConf.create(config))
    for key, value in (overrides or {}).items():
        if OmegaConf.select(cfg, key, default=_MISSING) is _MISSING:
            raise CheckpointError(f"{file}: override {key}={value!r}: the run config has no key {key!r}")
        OmegaConf.update(cfg, key, value)
    if torch.device(device).type != "cuda" and OmegaConf.select(cfg, "renderer.backend") == "nvdiffrast":
        cfg.renderer.backend = "torch"  # a GPU run used away from a GPU: the same rasterizer contract in PyTorch
    method = get_method(str(cfg.method.name))(cfg)
    try:
        method.load_state_dict(checkpoint["state_dict"])
    except RuntimeError as error:  # weights of another architecture than the saved config builds
        raise CheckpointError(f"{file}: its weights do not fit the {cfg.method.name} method its config "
                              f"describes ({str(error).splitlines()[0]}); was it written by another facelab "
                              "version, or edited?") from error
    return method.to(device).eval()


def _with_current_defaults(saved):
    """The saved run config with its ``method`` block laid over today's conf/method/<name>.yaml,
    so that a checkpoint written before a method option existed still builds (the option takes
    the method file's default; no profile's values, no other group)."""
    from omegaconf import OmegaConf

    from facelab.config import conf_dir

    path = conf_dir() / "method" / f"{saved.method.name}.yaml"
    if not path.is_file():  # a method without a config file of its own: the saved block alone
        return saved
    defaults = OmegaConf.load(path)
    for key in ("defaults", "global"):  # group-file directives, not method options
        defaults.pop(key, None)
    return OmegaConf.merge(saved, {"method": OmegaConf.merge(defaults, saved.method)})
