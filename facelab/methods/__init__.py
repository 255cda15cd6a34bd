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
