"""One rule for turning configuration values into their typed fields (grad-train's RunConfig, F2PAD's
RefineConfig): the same ``--set`` string means the same value in every command."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

import yaml

from gradad.errors import ConfigError
from gradad.text import shown_value


class _NoAliasLoader(yaml.SafeLoader):
    """PyYAML's safe loader without anchors and aliases: a 300-byte file of nested aliases ("billion laughs")
    expands to gigabytes once anything walks it (an error message's repr, a type check)."""

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):
            raise yaml.composer.ComposerError(None, None, "aliases (*name) are not allowed here; write the values out",
                                              self.peek_event().start_mark)
        return super().compose_node(parent, index)

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        """A mapping whose keys are all different: PyYAML keeps the last of two equal keys, so a forgotten
        ``threshold: 20`` above a ``threshold: 30`` would silently run at 30."""
        seen: dict[Any, int] = {}
        for key_node, _value in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # "<<:" overrides on purpose
                continue
            key = self.construct_object(key_node, deep=deep)
            line = key_node.start_mark.line + 1
            try:
                first = seen.get(key)
            except TypeError:  # an unhashable key: the base class says so
                continue
            if first is not None:
                lines = f"twice on line {line}" if first == line else f"on lines {first} and {line}"
                raise yaml.constructor.ConstructorError(None, None,
                                                        f"duplicate key {shown_value(key)} {lines}: keep one")
            seen[key] = line
        return super().construct_mapping(node, deep=deep)


#: largest settings file read (a run config or a line file is a few KB; PyYAML's pure-Python reader takes seconds
#: a megabyte, so a huge file would hang a command before any check could name it)
SETTINGS_FILE_MAX_BYTES = 1 << 20


def read_settings_text(path: str | Path) -> str:
    """A settings file's text: at most :data:`SETTINGS_FILE_MAX_BYTES`, UTF-8. ``OSError`` when it cannot be read,
    ``yaml.YAMLError`` saying what is wrong otherwise (the callers report both naming the file)."""
    with open(path, "rb") as f:
        raw = f.read(SETTINGS_FILE_MAX_BYTES + 1)
    if len(raw) > SETTINGS_FILE_MAX_BYTES:
        raise yaml.YAMLError(f"larger than {SETTINGS_FILE_MAX_BYTES // 1024} KB: not a settings file")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw[:exc.start].count(b"\n") + 1
        raise yaml.YAMLError(f"not UTF-8 text (a byte that is not UTF-8 on line {line})") from None


def load_settings_file(text: str) -> Any:
    """A YAML or JSON settings file's content (plain values only, no aliases, no key twice in one mapping); errors
    are ``yaml.YAMLError``."""
    try:
        return yaml.load(text, Loader=_NoAliasLoader)  # noqa: S506 - a SafeLoader subclass
    except ValueError as exc:  # an integer of more than 4300 digits: int() refuses it (CVE-2020-10735)
        raise yaml.YAMLError(f"a value cannot be read ({str(exc).split(':')[0]})") from None
    except RecursionError:  # PyYAML's composer recurses once per nesting level
        raise yaml.YAMLError("nested too deeply (hundreds of levels of lists or mappings)") from None


def yaml_error_text(exc: yaml.YAMLError) -> str:
    """What is wrong with a settings file and where (line, column), without PyYAML's quote of the offending line:
    that line may hold a password or a webhook token, and the message goes to stderr and service logs."""
    problem = getattr(exc, "problem", None)
    if problem is None:  # raised without marks (e.g. our duplicate-key check): the message quotes no line
        return str(exc).split("\n", 1)[0]

    def at(mark: Any) -> str:
        return f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""

    context = getattr(exc, "context", None)
    opening = f"{context}{at(getattr(exc, 'context_mark', None))}: " if context else ""
    return f"{opening}{problem}{at(getattr(exc, 'problem_mark', None))}"


def _is_optional(hint: Any) -> bool:
    return type(None) in get_args(hint)


def _split_items(value: str) -> list[Any]:
    """"a,b" -> ["a", "b"]: one ``--set`` string of a list or tuple setting (YAML reads ``1,2`` as one string)."""
    return [yaml.safe_load(v) for v in value.split(",") if v.strip()]


def coerce_setting(value: Any, hint: Any, where: str) -> Any:
    """``value`` (from YAML, JSON or a ``--set key=value`` string) as the type ``hint`` of a typed config field
    names, or a one-line ConfigError naming the setting ``where``: Literal choices, tuples (length checked) and
    lists element by element, floats from strings such as ``1e-4`` (which PyYAML reads as text) and finite only,
    no bool for a number, empty only where the field is optional."""
    origin = get_origin(hint)
    args = get_args(hint)
    if value is None:
        if hint is Any or _is_optional(hint):
            return None
        # "--set train.batch_size=" (YAML null): refused here rather than crashing later with a traceback
        raise ConfigError(f"setting {where} is empty: it needs a value (only optional settings may be empty)")
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"setting {where} = {shown_value(value)}: must be one of {', '.join(map(str, args))}")
        return value
    if origin is tuple:
        items = _split_items(value) if isinstance(value, str) else value  # "--set model.map_scales=1,3,5"
        if not isinstance(items, (list, tuple)):
            items = [items]
        if args and args[-1] is Ellipsis:
            types = [args[0]] * len(items)
        elif args:
            if len(items) != len(args):
                raise ConfigError(f"setting {where} = {shown_value(value)}: expected {len(args)} values, "
                                  f"got {len(items)}")
            types = list(args)
        else:
            types = [Any] * len(items)
        return tuple(coerce_setting(v, t, where) for v, t in zip(items, types))
    if origin is list:
        if isinstance(value, str):  # "--set data.classes=a,b" or a single name, not its letters
            element = args[0] if args else Any
            items = [v.strip() for v in value.split(",") if v.strip()] if element is str else _split_items(value)
        elif isinstance(value, (list, tuple)):
            items = list(value)
        elif isinstance(value, dict):
            raise ConfigError(f"setting {where} = {shown_value(value)}: expected a list")
        else:
            items = [value]
        return [coerce_setting(v, args[0] if args else Any, where) for v in items]
    if args and _is_optional(hint):  # Optional[X]
        inner = [a for a in args if a is not type(None)]
        return coerce_setting(value, inner[0], where) if len(inner) == 1 else value
    if hint is float:
        if isinstance(value, str):  # PyYAML reads "1e-4" (no dot) as a string, not a float
            try:
                value = float(value.strip())
            except ValueError:
                raise ConfigError(f"setting {where} = {shown_value(value)}: expected a finite number") from None
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ConfigError(f"setting {where} = {shown_value(value)}: expected a finite number")
        return float(value)
    if hint is int and isinstance(value, bool):
        raise ConfigError(f"setting {where} = {shown_value(value)}: expected an integer")
    if hint in (int, str, bool) and not isinstance(value, hint):
        raise ConfigError(f"setting {where} = {shown_value(value)}: expected {hint.__name__}")
    return value
