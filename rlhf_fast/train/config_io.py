"""Reading and writing trainer configs: a dataclass per trainer, filled from a YAML file and ``key=value``
overrides. The options themselves and their checks are in ``config.py``, which re-exports these functions.

    cfg = load_config(Config, "ppo.yaml", ["lr=1e-5", "ppo.kl_coef=0.05", "model=/ckpt/sft"])

Precedence: the dataclass defaults, then the YAML mapping, then the overrides in order. Every value is
checked against the field's annotation (``int``, ``float``, ``bool``, ``str``, ``Path``, ``Optional``,
``Literal``, ``list``/``tuple``/``dict`` of those, nested dataclasses) and converted where that is
lossless (``1e-4`` to a float, ``"3"`` to an int for an int field, ``2`` to ``2.0`` for a float field); an
unknown key or a value of the wrong type raises ``ValueError`` naming the dotted key.

Override values are read with ``yaml.safe_load`` (``true``, ``null``, ``[1, 2]``, ``{a: 1}``), except that a
``str`` field gets the text exactly as written (``run_name=007`` stays ``"007"``).
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import types
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, TypeVar, Union

import yaml

__all__ = [
    "add_config_args",
    "config_from_args",
    "config_to_dict",
    "describe_config",
    "load_config",
    "parse_overrides",
    "save_config",
]

T = TypeVar("T")

# Strings that mean None for an Optional field (YAML's own null spellings, which safe_load already maps,
# plus "none", which people type on command lines).
_NONE_WORDS = {"null", "none", "~", ""}
# Strings accepted for a bool field when they arrive as text (YAML maps most of them already).
_TRUE_WORDS = {"true", "yes", "on", "1"}
_FALSE_WORDS = {"false", "no", "off", "0"}


class _Override:
    """A command-line value: the text as typed and its YAML reading. A str field takes the text."""

    __slots__ = ("text", "value")

    def __init__(self, text: str):
        self.text = text
        try:
            self.value = yaml.safe_load(text) if text.strip() else text
        except yaml.YAMLError:
            self.value = text

    def __repr__(self) -> str:
        return repr(self.text)


def load_config(cls: type[T], path: str | Path | None = None, overrides: Sequence[str] = ()) -> T:
    """An instance of the dataclass ``cls`` from its defaults, the YAML mapping at ``path`` (if any) and
    ``overrides`` (``"key=value"`` or ``"section.key=value"`` strings, applied in order)."""
    if not dataclasses.is_dataclass(cls) or not isinstance(cls, type):
        raise TypeError(f"load_config wants a dataclass type, got {cls!r}")
    data: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ValueError(f"config file {str(path)!r} does not exist")
        with open(path, encoding="utf-8") as f:
            loaded = yaml.safe_load(f)
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, Mapping):
            raise ValueError(f"config file {str(path)!r} must hold a YAML mapping of keys to values, "
                             f"got {type(loaded).__name__}")
        data = _plain_copy(loaded)
    for key, value in parse_overrides(overrides):
        _set_dotted(cls, data, key, value)
    return _build(cls, data, prefix="")


def parse_overrides(overrides: Sequence[str]) -> list[tuple[str, _Override]]:
    """``["a.b=1", "c=x"]`` → ``[("a.b", <1>), ("c", <"x">)]``; a string without ``=`` is a ``ValueError``."""
    if isinstance(overrides, str):
        overrides = [overrides]
    parsed = []
    for item in overrides:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ValueError(f"override {item!r} is not of the form key=value")
        parsed.append((key, _Override(text)))
    return parsed


def config_to_dict(cfg: Any) -> dict[str, Any]:
    """The config as plain YAML-safe Python: nested dicts, lists, str, int, float, bool, None."""
    if not dataclasses.is_dataclass(cfg) or isinstance(cfg, type):
        raise TypeError(f"config_to_dict wants a dataclass instance, got {type(cfg).__name__}")
    return _to_plain(cfg)


def save_config(cfg: Any, path: str | Path) -> Path:
    """Write ``cfg`` as YAML (field order kept) so that ``load_config(type(cfg), path)`` gives it back."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        yaml.safe_dump(config_to_dict(cfg), f, sort_keys=False, default_flow_style=False)
    return path


def describe_config(cls: type) -> str:
    """One line per (dotted) field: name, type and default — for ``--help`` texts."""
    lines = []
    for name, tp, default in _walk_fields(cls, prefix=""):
        shown = "(required)" if default is dataclasses.MISSING else repr(default)
        lines.append(f"  {name}: {_type_name(tp)} = {shown}")
    return "\n".join(lines)


def add_config_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add ``--config PATH`` and trailing ``key=value`` overrides to ``parser``; read them back with
    ``config_from_args(cls, args)``."""
    parser.add_argument("--config", metavar="PATH", default=None, help="YAML file with the config's keys")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="override one key (dotted for nested sections), e.g. lr=1e-4 ppo.kl_coef=0.05")
    return parser


def config_from_args(cls: type[T], args: argparse.Namespace) -> T:
    """``load_config(cls, args.config, args.overrides)`` for a parser set up by ``add_config_args``."""
    return load_config(cls, getattr(args, "config", None), getattr(args, "overrides", None) or ())


# ---------------------------------------------------------------------------------------------------
# building and checking


def _fields(cls: type) -> dict[str, tuple[dataclasses.Field, Any]]:
    """Init fields of a dataclass with their resolved annotations (string annotations included), in the
    order of ``_ordered_fields``."""
    hints = typing.get_type_hints(cls)
    return {f.name: (f, hints.get(f.name, Any)) for f in _ordered_fields(cls) if f.init}


def _ordered_fields(cls: type) -> list[dataclasses.Field]:
    """A config's fields as YAML, ``--print-config`` and ``--help`` list them: the class's own first (in the
    order written, a redeclared default included), then what it inherits, nearest base first; so every
    trainer's file starts with its models and data and ends with the shared run options (``RunConfig``).
    ``dataclasses.fields`` would put the most distant base's fields first."""
    by_name = {f.name: f for f in dataclasses.fields(cls)}
    order: dict[str, None] = {}
    for klass in cls.__mro__:
        order.update((name, None) for name in inspect.get_annotations(klass) if name in by_name)
    return [by_name[name] for name in order]


def _unknown_key(key: str, cls: type, prefix: str) -> ValueError:
    valid = ", ".join(prefix + name for name in _fields(cls))
    return ValueError(f"unknown config key {key!r} for {cls.__name__}; valid keys: {valid}")


def _set_dotted(cls: type, data: dict, key: str, value: _Override) -> None:
    """Put an override into the nested mapping ``data``, checking each part of the key on the way."""
    parts = key.split(".")
    node, node_cls, prefix = data, cls, ""
    for i, part in enumerate(parts):
        fields = _fields(node_cls)
        if part not in fields:
            raise _unknown_key(prefix + part, node_cls, prefix)
        if i == len(parts) - 1:
            node[part] = value
            return
        sub_cls = _dataclass_in(fields[part][1])
        if sub_cls is None:
            raise ValueError(f"config key {prefix + part!r} is not a section (its type is "
                             f"{_type_name(fields[part][1])}), so {key!r} does not exist")
        child = node.get(part)
        if isinstance(child, _Override):  # an earlier "section={...}" override: open it up
            child = child.value
        if child is None:
            child = {}
        if not isinstance(child, Mapping):
            raise ValueError(f"config key {prefix + part!r} must be a mapping, got {child!r}")
        node[part] = child = dict(child)
        node, node_cls, prefix = child, sub_cls, prefix + part + "."


def _build(cls: type, data: Mapping, prefix: str) -> Any:
    fields = _fields(cls)
    for key in data:
        if key not in fields:
            raise _unknown_key(prefix + str(key), cls, prefix)
    kwargs = {}
    for name, (field, tp) in fields.items():
        key = prefix + name
        if name in data:
            kwargs[name] = _coerce(data[name], tp, key)
        elif _dataclass_in(tp) is not None and _no_default(field):
            kwargs[name] = _build(_dataclass_in(tp), {}, key + ".")
        elif _no_default(field):
            raise ValueError(f"config key {key!r} is required (no default) and was not given")
    return cls(**kwargs)


def _no_default(field: dataclasses.Field) -> bool:
    return field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING


def _coerce(raw: Any, tp: Any, key: str) -> Any:
    """``raw`` checked against and converted to the annotation ``tp``; ValueError naming ``key`` if not."""
    text = raw.text if isinstance(raw, _Override) else None
    value = raw.value if isinstance(raw, _Override) else raw
    origin, args = typing.get_origin(tp), typing.get_args(tp)

    if tp is Any or tp is object:
        return value
    if origin is Union or origin is types.UnionType:
        if type(None) in args and (value is None or (isinstance(value, str) and value.strip().lower() in _NONE_WORDS)):
            return None
        options = [a for a in args if a is not type(None)]
        errors = []
        # str last: "3" for int | str is the int 3, but a str field is never tried before the others
        for option in sorted(options, key=lambda a: a is str):
            try:
                return _coerce(raw, option, key)
            except ValueError as e:
                errors.append(e)
        words = [_wanted(a) for a in args]
        if len(options) == 1 and None in words:
            raise errors[0]  # Optional[a list, mapping or section]: its own error names the item at fault
        described = " or ".join(w or f"a {_type_name(a)}" for w, a in zip(words, args))
        raise ValueError(f"config key {key!r}: {value!r} is not {described}")
    if origin is Literal:
        for choice in args:
            candidate = text if isinstance(choice, str) and text is not None else value
            if candidate == choice and type(candidate) is type(choice):
                return choice
            if isinstance(choice, str) and not isinstance(candidate, str) and str(candidate) == choice:
                return choice
        raise ValueError(f"config key {key!r}: {value!r} is not one of {', '.join(map(repr, args))}")
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, Mapping):
            raise ValueError(f"config key {key!r} is a section ({tp.__name__}); give a mapping, got {value!r}")
        return _build(tp, value, key + ".")
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
        if isinstance(value, str) and value.strip().lower() in _TRUE_WORDS | _FALSE_WORDS:
            return value.strip().lower() in _TRUE_WORDS
        raise ValueError(f"config key {key!r} wants a bool (true/false), got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        number = _as_number(value)
        if number is not None and float(number).is_integer():
            return int(number)
        raise ValueError(f"config key {key!r} wants an int, got {value!r}")
    if tp is float:
        number = _as_number(value)
        if number is not None:
            return float(number)
        raise ValueError(f"config key {key!r} wants a float, got {value!r}")
    if tp is str:
        if text is not None:
            return text
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)  # a YAML file's `name: 123`
        raise ValueError(f"config key {key!r} wants a string, got {value!r}")
    if tp is Path or (isinstance(tp, type) and issubclass(tp, Path)):
        if text is not None:
            return Path(text)
        if isinstance(value, (str, Path)):
            return Path(value)
        raise ValueError(f"config key {key!r} wants a path, got {value!r}")
    if origin in (list, tuple, Sequence, typing.Sequence) or tp in (list, tuple):
        if isinstance(value, str) or not isinstance(value, (list, tuple)):
            raise ValueError(f"config key {key!r} wants a list, got {value!r}")
        if origin is tuple and args and not (len(args) == 2 and args[1] is Ellipsis):
            if len(args) != len(value):
                raise ValueError(f"config key {key!r} wants {len(args)} items, got {len(value)}")
            return tuple(_coerce(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
        item_tp = args[0] if args else Any
        items = [_coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple or tp is tuple else items
    if origin in (dict, Mapping, typing.Mapping) or tp is dict:
        if not isinstance(value, Mapping):
            raise ValueError(f"config key {key!r} wants a mapping, got {value!r}")
        key_tp, val_tp = args if args else (Any, Any)
        return {_coerce(k, key_tp, f"{key}.{k}"): _coerce(v, val_tp, f"{key}.{k}") for k, v in value.items()}
    if isinstance(tp, type):
        if isinstance(value, tp):
            return value
        raise ValueError(f"config key {key!r} wants a {tp.__name__}, got {value!r}")
    return value  # an annotation we do not know how to check (a TypeVar, a Protocol): taken as given


def _wanted(tp: Any) -> str | None:
    """What a value of the scalar annotation ``tp`` is, in words (``"a float"``, ``"one of 'a', 'b'"``,
    ``"null"``) for the error of a union; None for a container or a section."""
    if tp is type(None):
        return "null"
    if typing.get_origin(tp) is Literal:
        return f"one of {', '.join(map(repr, typing.get_args(tp)))}"
    words = {bool: "a bool (true/false)", int: "an int", float: "a float", str: "a string", Path: "a path"}
    return words.get(tp)


def _as_number(value: Any) -> float | int | None:
    """An int or float from a number or a numeric string (YAML reads ``1e-4`` as a string), else None."""
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return value
    if isinstance(value, str):
        try:
            return int(value)
        except ValueError:
            pass
        try:
            return float(value)
        except ValueError:
            return None
    return None


def _dataclass_in(tp: Any) -> type | None:
    """The dataclass in ``tp`` (``Sub`` or ``Optional[Sub]``), or None."""
    if dataclasses.is_dataclass(tp) and isinstance(tp, type):
        return tp
    if typing.get_origin(tp) in (Union, types.UnionType):
        subs = [a for a in typing.get_args(tp) if dataclasses.is_dataclass(a)]
        if len(subs) == 1:
            return subs[0]
    return None


def _walk_fields(cls: type, prefix: str):
    for name, (field, tp) in _fields(cls).items():
        sub = _dataclass_in(tp)
        if sub is not None:
            yield from _walk_fields(sub, prefix + name + ".")
            continue
        if field.default is not dataclasses.MISSING:
            default = field.default
        elif field.default_factory is not dataclasses.MISSING:
            default = field.default_factory()
        else:
            default = dataclasses.MISSING
        yield prefix + name, tp, default


def _type_name(tp: Any) -> str:
    if isinstance(tp, type) and typing.get_origin(tp) is None:
        return tp.__name__
    return str(tp).replace("typing.", "")


def _plain_copy(data: Mapping) -> dict:
    return {k: _plain_copy(v) if isinstance(v, Mapping) else v for k, v in data.items()}


def _to_plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _to_plain(getattr(value, f.name)) for f in _ordered_fields(type(value))}
    if isinstance(value, Mapping):
        return {_to_plain(k): _to_plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_to_plain(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(f"config value {value!r} ({type(value).__name__}) cannot be written as YAML")
