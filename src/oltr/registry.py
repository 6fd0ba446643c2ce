"""One small registry shape for every kind of component chosen by name in a config.

A :class:`Registry` maps names to builders (classes or functions), in registration order. A
component is registered with a decorator, ``@LOSSES.register("focal")`` (or ``@register()``
for a class with a ``name`` attribute, or ``register("x", obj)`` without a decorator); a second
object under a taken name is refused. ``create(name, **kwargs)`` builds one, leaving out the
keyword arguments that are None, so that a builder's own defaults are the only defaults. The
config's allowed values for a component key are the registry's names, read when the config is
checked (so a component registered from outside the package is accepted like a built-in one).

The shape follows timm's ``register_model`` / ``create_model`` (``timm/models/_registry.py``,
``_factory.py``) and torchvision's ``register_model`` (``torchvision/models/_api.py``). This
module sits in the lowest layer: it imports only :mod:`oltr.errors`.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import Any, Generic, TypeVar, overload

from oltr.errors import InputError

T = TypeVar("T")
_MISSING: Any = object()


class Registry(Mapping[str, T], Generic[T]):
    """Named builders of one kind of component, in registration order.

    A read-only mapping name → builder (``name in registry``, ``registry[name]``, iteration
    over the names, ``len``), plus :meth:`register`, :meth:`create`, :meth:`entry`,
    :meth:`names` and :meth:`pop`.

    Args:
        kind: what a builder builds, singular (``"detector"``), for messages.
        unknown: the message of an unknown name; ``{names}`` is replaced by the valid names
            joined by ``", "``, ``{names_or}`` by the names joined by ``" or "`` (default:
            ``"unknown {kind} (valid: {names})"``). The name is the error's value.
        name_attribute: where :meth:`register` without a name finds the name of the object it
            registers (a class attribute such as a detector's ``name``).
    """

    def __init__(self, kind: str, *, unknown: str | None = None,
                 name_attribute: str = "name") -> None:
        self.kind = kind
        self._unknown = unknown if unknown is not None else f"unknown {kind} (valid: {{names}})"
        self._name_attribute = name_attribute
        self._entries: dict[str, T] = {}

    # ------------------------------------------------------------------ registration
    @overload
    def register(self, name: str | None = None) -> Callable[[T], T]: ...

    @overload
    def register(self, name: str | None, obj: T) -> T: ...

    def register(self, name: str | None = None, obj: T = _MISSING) -> Callable[[T], T] | T:
        """Register ``obj`` as ``name``; without ``obj``, a decorator that does so.

        Without a ``name``, the object's ``name_attribute`` (e.g. a class attribute
        ``name = "msp"``) is its name. Registering the very same object again under its name
        is a no-op (a module imported twice); another object under a taken name is refused.

        Raises:
            InputError: no usable name (not a non-empty string), or a name already registered
                for another object (``a <kind> of this name is already registered``).
        """
        if obj is _MISSING:
            def decorator(target: T) -> T:
                return self.register(name, target)
            return decorator
        if name is None:
            name = getattr(obj, self._name_attribute, None)
        if not isinstance(name, str) or not name:
            raise InputError(f"a {self.kind} needs a name (a non-empty string)", value=name)
        if name in self._entries and self._entries[name] is not obj:
            raise InputError(f"a {self.kind} of this name is already registered", value=name)
        self._entries[name] = obj
        return obj

    def pop(self, name: str, default: Any = _MISSING) -> T | Any:
        """Remove ``name`` and return what was registered (``default`` if there is none; as
        ``dict.pop``), e.g. to undo a registration in a test.

        Raises:
            KeyError: ``name`` is not registered and no ``default`` is given.
        """
        if default is _MISSING:
            return self._entries.pop(name)
        return self._entries.pop(name, default)

    # ------------------------------------------------------------------ lookup
    def names(self) -> list[str]:
        """The registered names, in registration order."""
        return list(self._entries)

    def unknown_error(self, name: Any) -> InputError:
        """The error for an unknown ``name``: the registry's message, listing the valid names,
        with ``name`` as its value."""
        message = self._unknown.replace("{names}", ", ".join(self._entries))
        message = message.replace("{names_or}", " or ".join(self._entries))
        return InputError(message, value=name)

    def entry(self, name: Any) -> T:
        """The builder registered as ``name``.

        Raises:
            InputError: ``name`` is not registered (the message lists the valid names).
        """
        if not isinstance(name, str) or name not in self._entries:
            raise self.unknown_error(name)
        return self._entries[name]

    def create(self, name: Any, /, *args: Any, **kwargs: Any) -> Any:
        """Build the component registered as ``name``: its builder called with ``args`` and
        the ``kwargs`` that are not None (None means "not given": the builder's default
        applies, so defaults live in the builder only; timm's ``create_model`` does the same).

        Raises:
            InputError: ``name`` is not registered (the message lists the valid names); and
                whatever the builder raises.
        """
        builder: Any = self.entry(name)
        return builder(*args, **{key: value for key, value in kwargs.items()
                                 if value is not None})

    # ------------------------------------------------------------------ Mapping
    def __getitem__(self, name: str) -> T:
        return self._entries[name]

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}, {self.names()})"


__all__ = ["Registry"]
