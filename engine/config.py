"""Typed run configs: YAML and ``key=value`` overrides in, a tree of dataclasses out.

Each engine component owns a ``@dataclass`` config in its own module (``CohortConfig`` next to the
cohort reader, ``ScarSamplerConfig`` next to the sampler) and checks its own invariants in
``__post_init__``; a run's config is a tree of them. This module is the generic machinery, driven
only by type hints: it builds that tree from plain YAML data and fails loudly, naming the dotted key
and the file (``configs/demo.yaml: cohort.reference_angle: expected float, got str 'abc'``).

Supported field types: ``int``, ``float`` (an int is accepted), ``str``, ``bool`` (real YAML booleans
only, never ``"yes"``), ``Path``, ``Literal[...]``, ``Optional[X]`` / ``X | None`` and other unions,
``list[X]``, ``tuple[X, ...]`` and fixed-length tuples, ``dict[str, X]``, ``Any`` and nested
dataclasses. A ``bool`` is never accepted as a number. YAML is read by PyYAML, except that ``1e-4``
is a float (PyYAML's YAML 1.1 makes it a string) and a duplicated key is an error.

Credentials never live in configs: object-store keys, tokens and passwords come from the environment
or the standard provider chains (AWS/GCS credential chains, instance roles), so a config can be
committed, logged and stored in a run's attributes as it is. No config field should hold a secret.

Example:
    .. code-block:: python

        @dataclass
        class CohortConfig:
            root: str
            reference_angle: float = 120.0

        @dataclass
        class RunConfig:
            cohort: CohortConfig
            seed: int = 0

        config = load_config(RunConfig, "configs/demo.yaml", ["cohort.reference_angle=110", "seed=3"])
        dump_config(config, "runs/demo/config.yaml")
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import functools
import os
import re
import types
from collections.abc import Mapping
from pathlib import Path, PurePath
from typing import Any, Iterable, Literal, TypeVar, Union, get_args, get_origin, get_type_hints

import yaml

__all__ = ["ConfigError", "refuse_url_credentials", "from_dict", "to_dict", "parse_override", "apply_overrides", "load_config", "dump_config"]

T = TypeVar("T")


class ConfigError(ValueError):
    """A config value, key, override or file is wrong.

    Args:
        message: What is wrong, starting with the dotted key when there is one.
        key: The full dotted key at fault (``"cohort.reference_angle"``), if known.
        source: Where the config came from (a file path, an override), if known; prefixes the message.
    """

    def __init__(self, message: str, *, key: str | None = None, source: str | None = None):
        self.message, self.key, self.source = message, key, source
        super().__init__(f"{source}: {message}" if source else message)

    def with_source(self, source: str) -> ConfigError:
        """The same error, attributed to ``source`` unless it already names one."""
        return self if self.source else ConfigError(self.message, key=self.key, source=source)


class _ConfigLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that reads ``1e-4`` as a float and rejects duplicated keys."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    "while reading a mapping", node.start_mark, f"duplicate key {key!r}", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


_ConfigLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float", re.compile(r"^[-+]?[0-9][0-9_]*(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"), list("-+0123456789"))


def _yaml_load(text: str, name: str) -> Any:
    loader = _ConfigLoader(text)
    loader.name = name  # shown in PyYAML's error marks instead of "<unicode string>"
    try:
        return loader.get_single_data()
    finally:
        loader.dispose()


@functools.lru_cache(maxsize=None)
def _init_fields(cls: type) -> dict[str, tuple[Any, bool]]:
    """``{name: (type hint, required)}`` for the fields ``cls.__init__`` takes."""
    hints = get_type_hints(cls)
    return {
        f.name: (hints[f.name], f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING)
        for f in dataclasses.fields(cls) if f.init
    }


def _type_name(tp: Any) -> str:
    origin, args = get_origin(tp), get_args(tp)
    if tp is type(None):
        return "None"
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if origin in (Union, types.UnionType):
        return " | ".join(_type_name(a) for a in args)
    if origin is not None and args:
        return f"{origin.__name__}[{', '.join('...' if a is Ellipsis else _type_name(a) for a in args)}]"
    return getattr(tp, "__name__", repr(tp))


def _got(value: Any) -> str:
    if value is None:
        return "None"
    text = repr(value)
    return f"{type(value).__name__} {text if len(text) <= 60 else text[:57] + '...'}"


def _join(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name


_URL_USERINFO = re.compile(r"^(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*)://(?P<userinfo>[^/@]*)@(?P<rest>.*)$", re.S)


def refuse_url_credentials(value: str, key: str) -> None:
    """A URL with a password in it (``s3://KEY:SECRET@bucket/x``) is refused, the secret never shown:
    credentials come from the environment, never from a config (a user name alone, ``ssh://me@host``,
    is no secret)."""
    match = _URL_USERINFO.match(value)
    if match and ":" in match["userinfo"]:
        raise ConfigError(f"{key}: a URL with credentials in it ({match['scheme']}://***@{match['rest']}) is refused: "
                          "set them in the environment (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, a profile, or "
                          "the cloud's provider chain); a config is logged and stored with its run")


def _is_dataclass_type(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _convert(value: Any, tp: Any, key: str, shown: Any = None) -> Any:
    """``value`` checked against (and, for containers, rebuilt as) type ``tp``; ``key`` names it in errors.

    ``shown`` is the type named in a mismatch at this level (``int | None`` rather than ``int``).
    """
    expected = _type_name(tp if shown is None else shown)

    def mismatch() -> ConfigError:
        return ConfigError(f"{key or '<top level>'}: expected {expected}, got {_got(value)}", key=key)

    origin, args = get_origin(tp), get_args(tp)
    if tp is Any:
        return value
    if tp is type(None):
        if value is None:
            return None
        raise mismatch()
    if origin in (Union, types.UnionType):
        if value is None:
            if type(None) in args:
                return None
            raise mismatch()
        arms = [a for a in args if a is not type(None)]
        if len(arms) == 1:
            return _convert(value, arms[0], key, shown=tp)
        for arm in arms:
            try:
                return _convert(value, arm, key)
            except ConfigError:
                continue
        raise mismatch()
    if origin is Literal:
        # type() as well as ==, so True does not pass for Literal[1].
        if any(value == a and type(value) is type(a) for a in args):
            return value
        raise mismatch()
    if _is_dataclass_type(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, Mapping):
            raise ConfigError(f"{key or '<top level>'}: expected a mapping for {tp.__name__}, got {_got(value)}",
                              key=key)
        return _build(tp, value, key)
    if tp in (list, tuple, dict):
        origin, args = tp, ()
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise mismatch()
        if origin is list or not args or (len(args) == 2 and args[1] is Ellipsis):
            item_type = args[0] if args else Any
            items = [_convert(v, item_type, f"{key}[{i}]") for i, v in enumerate(value)]
            return items if origin is list else tuple(items)
        if len(value) != len(args):
            raise ConfigError(f"{key}: expected {expected} ({len(args)} items), got {len(value)} items "
                              f"{_got(value)}", key=key)
        return tuple(_convert(v, t, f"{key}[{i}]") for i, (v, t) in enumerate(zip(value, args)))
    if origin is dict:
        if not isinstance(value, Mapping):
            raise mismatch()
        key_type, item_type = args if args else (Any, Any)
        out = {}
        for k, v in value.items():
            item_key = _join(key, str(k))
            out[_convert(k, key_type, f"{item_key} (key)")] = _convert(v, item_type, item_key)
        return out
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise mismatch()
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise mismatch()
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise mismatch()
    if tp is str:
        if isinstance(value, str):
            refuse_url_credentials(value, key)
            return value
        raise mismatch()
    if isinstance(tp, type) and issubclass(tp, PurePath):
        if isinstance(value, (str, PurePath)):
            return tp(value)
        raise mismatch()
    raise TypeError(f"{key}: config field type {_type_name(tp)} is not supported by engine.config")


def _build(cls: type, data: Mapping, path: str) -> Any:
    fields = _init_fields(cls)
    unknown = [k for k in data if k not in fields]
    if unknown:
        problems = []
        for name in unknown:
            close = difflib.get_close_matches(str(name), list(fields), n=1)
            hint = f"did you mean {close[0]!r}?" if close else f"valid keys: {', '.join(fields) or 'none'}"
            problems.append(f"unknown key {_join(path, str(name))!r} ({hint})")
        raise ConfigError("; ".join(problems), key=_join(path, str(unknown[0])))
    missing = [name for name, (_, required) in fields.items() if required and name not in data]
    if missing:
        raise ConfigError("; ".join(f"missing required key {_join(path, m)!r}" for m in missing),
                          key=_join(path, missing[0]))
    kwargs = {name: _convert(value, fields[name][0], _join(path, name)) for name, value in data.items()}
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except ValueError as exc:  # the component's own __post_init__ checks
        raise ConfigError(f"{path or cls.__name__}: {exc}", key=path or None) from exc


def from_dict(cls: type[T], data: Mapping[str, Any], path: str = "", *, source: str | None = None) -> T:
    """Build the dataclass ``cls`` (recursively) from plain YAML data, checking every value's type.

    Missing keys take the dataclass defaults; unknown keys, missing required keys, wrong types and
    ``ValueError`` from any ``__post_init__`` raise :class:`ConfigError` naming the dotted key.

    Args:
        cls: The dataclass to build, e.g. a run config whose fields are component configs.
        data: A mapping of field names to values, as ``yaml.safe_load`` returns it.
        path: Dotted key of ``data`` inside a larger config, used as the prefix in error messages.
        source: Where ``data`` came from (a file), used as the prefix of error messages.

    Example:
        >>> from dataclasses import dataclass
        >>> @dataclass
        ... class CohortConfig:
        ...     root: str
        ...     reference_angle: float = 120.0
        >>> from_dict(CohortConfig, {"root": "data/emidec", "reference_angle": 110})
        CohortConfig(root='data/emidec', reference_angle=110.0)
    """
    if not _is_dataclass_type(cls):
        raise TypeError(f"from_dict expects a dataclass type, got {cls!r}")
    try:
        return _convert(data, cls, path)
    except ConfigError as err:
        raise (err.with_source(source) if source else err) from err.__cause__


def to_dict(obj: Any) -> Any:
    """Plain, YAML/JSON-serializable data of a config dataclass; ``from_dict`` rebuilds it.

    Tuples become lists and paths strings; only fields that ``__init__`` takes are written.

    Args:
        obj: A config dataclass instance (or a value inside one).

    Example:
        >>> to_dict(CohortConfig(root="data/emidec"))  # doctest: +SKIP
        {'root': 'data/emidec', 'reference_angle': 120.0}
    """
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {name: to_dict(getattr(obj, name)) for name in _init_fields(type(obj))}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, Mapping):
        return {k: to_dict(v) for k, v in obj.items()}
    if isinstance(obj, PurePath):
        return str(obj)
    return obj


def config_changes(old: Any, new: Any, ignore: tuple[str, ...] = (), prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two JSON-like configs, as ``"key: old -> new"``
    (values as ``repr``, cut at 80 characters: hashes and fingerprints stay readable); keys matching
    a glob of ``ignore`` (``fnmatch`` on the dotted key) are skipped; a list equals a tuple of the
    same items (a config read back from JSON against one in memory).

    Example:
        >>> config_changes({"loop": {"lr": 1e-3, "epochs": 5}}, {"loop": {"lr": 3e-3, "epochs": 8}}, ("*.epochs",))
        ['loop.lr: 0.001 -> 0.003']
    """
    import fnmatch

    if prefix and any(fnmatch.fnmatchcase(prefix, pattern) for pattern in ignore):
        return []
    if isinstance(old, Mapping) and isinstance(new, Mapping):
        return [change for key in sorted(set(old) | set(new), key=str)
                for change in config_changes(old.get(key), new.get(key), ignore, f"{prefix}.{key}" if prefix else str(key))]
    if isinstance(old, (list, tuple)) and isinstance(new, (list, tuple)):
        old, new = list(old), list(new)
    if old == new:
        return []

    def shown(value: Any) -> str:
        text = repr(value)
        return text if len(text) <= 80 else text[:77] + "..."

    return [f"{prefix or 'value'}: {shown(old)} -> {shown(new)}"]


def parse_override(text: str) -> tuple[str, Any]:
    """Split a command-line ``key=value`` override; the value is read as YAML.

    Args:
        text: ``"dotted.key=value"``, e.g. ``"cohort.reference_angle=110"``, ``"train.bf16=true"``,
            ``"sampler.levels=[basal,mid]"``, ``"name=hello"`` (a plain string).

    Returns:
        ``(dotted_key, value)``, e.g. ``("cohort.reference_angle", 110)``.
    """
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key or any(not part for part in key.split(".")):
        raise ConfigError(f"malformed override {text!r}: expected dotted.key=value")
    try:
        return key, _yaml_load(raw, f"override {text!r}")
    except yaml.YAMLError as exc:
        raise ConfigError(f"malformed override {text!r}: value is not valid YAML ({exc})", key=key) from None


def apply_overrides(data: Mapping[str, Any], overrides: Iterable[str]) -> dict[str, Any]:
    """A copy of raw config data with ``key=value`` overrides applied, before validation.

    Nested mappings are created as needed, so a misspelled key reaches :func:`from_dict` and is
    rejected there with its dotted name; a value is type-checked there too. Keys of a nested config
    dataclass not set anywhere keep their defaults, but a ``dict[str, X]`` field set by an override
    replaces the field's default mapping rather than merging into it.

    Args:
        data: Raw config data, e.g. a loaded YAML file; not modified.
        overrides: ``key=value`` strings, applied in order (the last one wins).

    Example:
        >>> apply_overrides({"cohort": {"root": "a"}}, ["cohort.root=b", "seed=3"])
        {'cohort': {'root': 'b'}, 'seed': 3}
    """
    out = copy.deepcopy(dict(data))
    for text in overrides:
        key, value = parse_override(text)
        *parents, leaf = key.split(".")
        node = out
        for depth, part in enumerate(parents):
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                where = ".".join(parents[: depth + 1])
                raise ConfigError(f"override {text!r}: {where!r} holds {_got(child)}, not a mapping", key=where)
            node = child
        node[leaf] = value
    return out


def load_config(cls: type[T], path: str | os.PathLike, overrides: Iterable[str] = ()) -> T:
    """Read a YAML config file, apply ``key=value`` overrides, and build the dataclass ``cls``.

    Args:
        cls: The config dataclass, e.g. the run config.
        path: A local YAML file whose top level is a mapping (an empty file means all defaults).
        overrides: Command-line ``key=value`` strings; see :func:`parse_override`.

    Example:
        >>> config = load_config(RunConfig, "configs/demo.yaml", ["seed=3"])  # doctest: +SKIP
    """
    overrides = list(overrides)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError("config file not found", source=str(path)) from None
    except OSError as exc:
        raise ConfigError(f"cannot read config file ({exc.strerror or exc})", source=str(path)) from None
    try:
        data = _yaml_load(text, str(path))
    except yaml.YAMLError as exc:
        raise ConfigError(f"invalid YAML: {exc}", source=str(path)) from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"the top level must be a mapping of keys to values, got {type(data).__name__}",
                          source=str(path))
    try:
        return from_dict(cls, apply_overrides(data, overrides))
    except ConfigError as err:
        # Blame the override that set the key if there is one, else the file.
        for text in reversed(overrides):
            key = text.partition("=")[0].strip()
            if err.key and (err.key == key or err.key.startswith((key + ".", key + "["))):
                raise err.with_source(f"{path} (override {text!r})") from err.__cause__
        raise err.with_source(str(path)) from err.__cause__


def dump_config(obj: Any, path: str | os.PathLike) -> None:
    """Write a config dataclass to a YAML file that :func:`load_config` reads back to an equal config.

    Args:
        obj: A config dataclass instance.
        path: The YAML file to write; parent folders are created.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(to_dict(obj), sort_keys=False, allow_unicode=True), encoding="utf-8")
