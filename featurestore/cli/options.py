"""Command-line options built from the settings' fields, each one also an environment variable.

    add_options(parser, OPTIONS)                        # a flag per option, help from the field
    values = option_values(args, OPTIONS, os.environ)   # the flags given, then FEATURESTORE_<NAME>
    settings = Settings.from_options(values)            # the rest keep the fields' defaults

Precedence: a flag, else its variable, else the field's default. The flags default to
nothing (argparse.SUPPRESS), so a flag given is told from one left out and the defaults
stay in featurestore/config.py alone. An empty variable counts as unset (a container
template that writes `NAME=` means "not set"). A variable that does not parse, or holds
a value out of range, raises an error whose one line names the variable.

The commands (cli/main.py, materialize/__main__.py) hand os.environ in; nothing below
them reads the environment. `featurestore-materialize` uses `environment_value` for its
own options, so both commands name and parse their variables the same way.
"""

from __future__ import annotations

import argparse
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from featurestore.config import GROUPS, Option
from featurestore.errors import ConfigError, InvalidArgument

__all__ = ["PREFIX", "add_options", "environment_value", "option_values", "shown_default", "variable"]

PREFIX = "FEATURESTORE_"

_METAVARS: dict[type[Any], str] = {int: "N", float: "SECONDS", Path: "PATH"}


def variable(name: str) -> str:
    """The environment variable of the option `name` (a setting's name or a flag).

    >>> variable("cache_bytes"), variable("--batch-rows")
    ('FEATURESTORE_CACHE_BYTES', 'FEATURESTORE_BATCH_ROWS')
    """
    return PREFIX + name.lstrip("-").replace("-", "_").upper()


def environment_value(name: str, kind: type[Any], environ: Mapping[str, str]) -> Any:
    """The value of option `name` from its variable in `environ`, converted to `kind`; None when unset.

    Parameters:
        name: the option's name or flag ("grace_s", "--grace-s"): FEATURESTORE_GRACE_S.
        kind: int, float, str, Path, or bool (true/false, 1/0, yes/no, on/off).
        environ: the environment (os.environ at the edge, a dict in tests).

    Raises InvalidArgument naming the variable when the text does not convert, e.g.
    "environment variable FEATURESTORE_PORT: invalid int value: 'http'".
    """
    text = environ.get(variable(name), "")
    if not text:
        return None
    try:
        return _switch(text) if kind is bool else kind(text)
    except (TypeError, ValueError):
        raise InvalidArgument(
            f"environment variable {variable(name)}: invalid {kind.__name__} value: {text!r}"
        ) from None


_SWITCH = {"1": True, "true": True, "yes": True, "on": True, "0": False, "false": False, "no": False, "off": False}


def _switch(text: str) -> bool:
    """A switch's variable: true/false, 1/0, yes/no, on/off (any case); ValueError otherwise."""
    value = _SWITCH.get(text.strip().lower())
    if value is None:
        raise ValueError(text)
    return value


def shown_default(option: Option) -> str:
    """The default of `option` as the help and the reference show it: "5 s", "268435456 (256 MiB)"."""
    value = option.default
    if value is None:
        return "unset"
    if option.kind is bool:
        return "on" if value else "off"
    if option.kind is float:
        return f"{value:g} s"
    if option.kind is int and option.name.endswith("bytes") and value and value % (1 << 20) == 0:
        return f"{value} ({value >> 20} MiB)"
    return str(value)


def add_options(parser: argparse.ArgumentParser, options: Iterable[Option]) -> None:
    """Add a flag per option to `parser`, in one argument group per settings group.

    Each flag's help is the field's help text, then its default and its variable; its
    type, choices and metavar come from the field's type; a bool is a switch, on when
    given. A flag left out is absent from the parsed namespace (see `option_values`).
    """
    groups: dict[str, argparse._ArgumentGroup] = {}
    for option in options:
        if option.group not in groups:
            described = GROUPS.get(option.group)
            title = f"{option.group} settings" if described else "repo and Redis"
            doc = (
                (described.__doc__ or "").split("\n")[0] if described else "Where the features are defined and stored."
            )
            groups[option.group] = parser.add_argument_group(title, doc)
        help_text = f"{option.help} Default: {shown_default(option)}. Environment: {variable(option.name)}."
        if option.kind is bool:  # a switch: on when given
            groups[option.group].add_argument(
                option.flag,
                dest=option.name,
                action="store_true",
                default=argparse.SUPPRESS,
                help=help_text.replace("%", "%%"),
            )
            continue
        groups[option.group].add_argument(
            option.flag,
            dest=option.name,
            type=option.kind,
            choices=option.choices or None,
            metavar=None if option.choices else _METAVARS.get(option.kind),
            default=argparse.SUPPRESS,
            help=help_text.replace("%", "%%"),  # argparse formats help with %
        )


def option_values(args: argparse.Namespace, options: Iterable[Option], environ: Mapping[str, str]) -> dict[str, Any]:
    """Option name -> value for every option given by a flag in `args` or else by its variable.

    Options given neither way are left out, so they keep their fields' defaults. A
    variable's value is checked here, so that its error names the variable:
    "FEATURESTORE_PORT: port must be an integer from 0 to 65535, not 70000".
    """
    values: dict[str, Any] = {}
    for option in options:
        if hasattr(args, option.name):
            values[option.name] = getattr(args, option.name)
            continue
        value = environment_value(option.name, option.kind, environ)
        if value is None:
            continue
        try:
            values[option.name] = option.check(value)
        except ConfigError as exc:
            raise ConfigError(f"{variable(option.name)}: {exc}") from None
    return values
