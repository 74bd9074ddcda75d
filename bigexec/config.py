"""The bigexec config file: one TOML table per system, and the default system.

Where it is: ``BIGEXEC_CONFIG`` if set, else ``$XDG_CONFIG_HOME/bigexec/config.toml``, else
``~/.config/bigexec/config.toml``. A missing file is the same as an empty one::

    system = "ec2"            # what bigexec.start() uses when nothing else names a system

    [ec2]
    instance_type = "m6i.large"
    alternatives = ["m5.large", "subnet-0abc"]
    tags = { team = "genomics" }

Precedence, for every option a system reads from here (the one place it is written down):
keyword argument > ``BIGEXEC_<SYSTEM>_<NAME>`` variable > the file's ``[<system>]`` table >
the option's default. For the system itself: ``bigexec.start``'s argument >
``BIGEXEC_SYSTEM`` > the file's top-level ``system`` > ``"local"``.

A system's table is checked by the system when it reads it (``Config.section``), against the
keys it knows and their TOML types, so that a misspelt key or a quoted number is an error
naming the file, the table and the key rather than an option silently left at its default.
Tables for other systems are not looked at. TOML is parsed with ``tomllib`` (Python 3.11+) or,
on Python 3.10, the ``tomli`` package, needed only when a file exists.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_args, get_origin

__all__ = ["CONFIG_VARIABLE", "Config", "ConfigError", "ConfigSource", "config_path",
           "load_config"]

#: Names the config file, over the XDG location.
CONFIG_VARIABLE = "BIGEXEC_CONFIG"

#: What callers may pass for a config: None (the default file), a path, or a parsed document.
ConfigSource = str | os.PathLike[str] | Mapping[str, Any] | None

#: The top-level keys that are not system tables.
_TOP_LEVEL_KEYS: dict[str, Any] = {"system": str}


class ConfigError(ValueError):
    """The config file cannot be read, is not TOML, or holds a key or value bigexec refuses."""


def config_path(environ: Mapping[str, str] | None = None) -> Path:
    """Where the config file is looked for (it need not exist)."""
    environ = os.environ if environ is None else environ
    named = environ.get(CONFIG_VARIABLE, "").strip()
    if named:
        return Path(named).expanduser()
    xdg = environ.get("XDG_CONFIG_HOME", "").strip()
    # The XDG base directory spec: a relative XDG_CONFIG_HOME is invalid and to be ignored.
    base = Path(xdg) if xdg and os.path.isabs(xdg) else Path.home() / ".config"
    return base / "bigexec" / "config.toml"


def _toml_parser() -> Any:
    # tomllib is in the standard library from 3.11 on; tomli is the same parser as a package.
    # Imported by name, when a file is there to read: mypy checks for 3.10, which has no
    # tomllib, and most programs never have a file.
    for name in ("tomllib", "tomli"):
        try:
            return importlib.import_module(name)
        except ModuleNotFoundError:
            continue
    return None


def _type_name(expected: Any) -> str:
    if get_origin(expected) is list:
        return f"an array of {_type_name(get_args(expected)[0])[2:]}s"
    if get_origin(expected) is dict:
        return f"a table of {_type_name(get_args(expected)[1])[2:]}s"
    return {str: "a string", bool: "a boolean", int: "an integer"}[expected]


def _toml_type_name(value: Any) -> str:
    names = {bool: "boolean", int: "integer", float: "float", str: "string", list: "array",
             dict: "table"}
    return names.get(type(value), type(value).__name__)


def _matches(value: Any, expected: Any) -> bool:
    origin = get_origin(expected)
    if origin is list:
        return isinstance(value, list) and all(_matches(v, get_args(expected)[0])
                                               for v in value)
    if origin is dict:
        return isinstance(value, dict) and all(_matches(v, get_args(expected)[1])
                                               for v in value.values())
    if expected is int and isinstance(value, bool):  # a Python bool is an int; TOML's is not
        return False
    return isinstance(value, expected)


@dataclass(frozen=True)
class Config:
    """A parsed config: ``source`` names it in errors (the file's path)."""

    source: str
    document: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for key, value in self.document.items():
            if key in _TOP_LEVEL_KEYS:
                self._check(None, key, value, _TOP_LEVEL_KEYS[key])
            elif not isinstance(value, Mapping):
                raise ConfigError(
                    f"{self.source}: unknown top-level key {key!r} "
                    f"({_toml_type_name(value)} {value!r}); known keys: "
                    f"{', '.join(sorted(_TOP_LEVEL_KEYS))}, and one table per system "
                    f"([ec2], [local], ...)")

    @property
    def system(self) -> str | None:
        """The top-level ``system``: the default system's name, if the file names one."""
        value = self.document.get("system")
        return value or None

    def section(self, name: str, known: Mapping[str, Any]) -> dict[str, Any]:
        """The ``[name]`` table, every key checked against ``known`` (key -> ``str``,
        ``bool``, ``int``, ``list[str]`` or ``dict[str, str]``); no table: ``{}``."""
        table = self.document.get(name, {})
        for key, value in table.items():
            if key not in known:
                raise ConfigError(
                    f"{self.source}: [{name}] unknown key {key!r}; known keys: "
                    f"{', '.join(sorted(known))}")
            self._check(name, key, value, known[key])
        return dict(table)

    def _check(self, section: str | None, key: str, value: Any, expected: Any) -> None:
        if not _matches(value, expected):
            where = f"[{section}] {key}" if section else key
            raise ConfigError(f"{self.source}: {where} must be {_type_name(expected)}, not "
                              f"{_toml_type_name(value)} {value!r}")

    def error(self, section: str, key: str, problem: str) -> ConfigError:
        """An error about ``[section] key``'s value, naming where it came from."""
        return ConfigError(f"{self.source}: [{section}] {key}: {problem}")


def load_config(config: ConfigSource = None,
                environ: Mapping[str, str] | None = None) -> Config:
    """The config: ``None`` reads the file at ``config_path(environ)``, a path reads that
    file, a mapping is taken as an already parsed file. A missing file is an empty config;
    an unreadable or malformed one raises ``ConfigError`` naming it."""
    if isinstance(config, Mapping):
        return Config("<config mapping>", config)
    path = config_path(environ) if config is None else Path(config)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return Config(str(path))
    except OSError as exc:
        raise ConfigError(f"cannot read the bigexec config file {path}: "
                          f"{exc.strerror or exc}") from None
    parser = _toml_parser()
    if parser is None:
        raise ConfigError(f"reading the bigexec config file {path} needs a TOML parser: "
                          f"on Python 3.10, pip install tomli")
    try:
        text = data.decode("utf-8")
        document = parser.loads(text)
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text: {exc}") from None
    except parser.TOMLDecodeError as exc:  # its message gives the line and column
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    return Config(str(path), document)

