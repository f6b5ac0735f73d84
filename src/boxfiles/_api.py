"""How the public surface is shaped (as trio does it): objects only the
library makes, and public names that say where users import them from."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import NoReturn, TypeVar

T = TypeVar("T")


class NoPublicConstructor(type):
    """Calling the class raises TypeError: instances come from the library
    (``cls._create``), never from user code. The class names what makes one
    in ``_made_by``."""

    _made_by: str

    def __call__(cls, *args: object, **kwargs: object) -> NoReturn:
        raise TypeError(
            f"{cls.__module__}.{cls.__qualname__} has no public constructor; use {cls._made_by}"
        )

    def _create(cls: type[T], *args: object, **kwargs: object) -> T:
        return super().__call__(*args, **kwargs)  # type: ignore[misc,no-any-return]


def publish(module: str, names: Iterable[str], namespace: Mapping[str, object]) -> None:
    """Give each public name's class or function ``__module__ = module``, so
    tracebacks and reprs name where users import it from, not the private
    module that defines it."""
    for name in names:
        obj = namespace[name]
        if getattr(obj, "__module__", "").startswith(module + "."):
            obj.__module__ = module
