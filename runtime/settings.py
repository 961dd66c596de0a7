"""Every view of the runtime's settings, derived from :class:`runtime.config.RunConfig`'s declarations.

Each ``RunConfig`` field declares its option, default, help and whether it is attested
(:class:`runtime.config.Setting`). From that one declaration come:

* the options of ``enclave-serve run`` and, for the attested settings, of ``enclave-serve
  initdata`` (:func:`add_arguments`; defaults are left out of the parsed namespace so that what
  the operator *gave* is known: :func:`given_settings`);
* the init-data's ``[settings]`` table (:func:`declared_settings`) and its reading back
  (:func:`resolve`), which takes every attested setting from the init-data and lets the command
  line only repeat a declared value or set an operational one;
* the table in docs/configuration.md (:func:`markdown_table`; a test keeps the two equal).
"""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from attest.initdata import ENCLAVE_SERVE_ENTRY, InitData, SettingValue, WorkloadPins
from foundation.errors import ConfigError
from runtime.config import SETTING, RunConfig, Setting

__all__ = [
    "add_arguments",
    "declared_name",
    "declared_settings",
    "given_settings",
    "markdown_table",
    "read_bounded",
    "read_ca_bundle",
    "resolve",
    "settings",
]

_MAX_CA_BUNDLE = 1 << 20


def settings() -> list[tuple[dataclasses.Field[Any], Setting]]:
    """Every ``RunConfig`` field with its declaration, in declaration order."""
    return [(f, f.metadata[SETTING]) for f in dataclasses.fields(RunConfig)]


def declared_name(name: str, spec: Setting) -> tuple[str, str]:
    """Where an attested setting is declared in the init-data entry: (table or "", key)."""
    if spec.declared.startswith("settings"):
        return "settings", spec.declared.partition(":")[2] or name
    return "", spec.declared


def _flag(name: str, spec: Setting) -> str:
    if name == "model":
        return "MODEL"
    if name == "vllm_args":
        return "the vLLM options (after --)"
    return spec.flag or name


def _default_text(f: dataclasses.Field[Any]) -> str | None:
    default = f.default
    if default is None or default is False or default == () or default == "":
        return None
    if isinstance(default, tuple):
        return ", ".join(default)
    return str(default)


def add_arguments(parser: argparse.ArgumentParser, *, attested_only: bool = False) -> None:
    """Add every setting's option to ``parser``, grouped as declared.

    The defaults are not put into the namespace (``argparse.SUPPRESS``): :func:`given_settings`
    returns only what was given, and :class:`RunConfig` supplies the rest. ``attested_only``
    adds only the settings an init-data declares (``enclave-serve initdata``).
    """
    groups: dict[str, argparse._ArgumentGroup] = {}
    for f, spec in settings():
        if spec.flag is None or f.name == "verbose":  # positional, passthrough, or the global -v
            continue
        if attested_only and (not spec.attested or not spec.in_initdata):
            continue
        group = groups.get(spec.group)
        if group is None:
            group = groups[spec.group] = parser.add_argument_group(spec.group)
        default = _default_text(f)
        help_text = spec.help + (f" (default {default})" if default and f.name != "tls_hostnames" else "")
        kwargs: dict[str, Any] = {"dest": f.name, "default": argparse.SUPPRESS, "help": help_text}
        if isinstance(f.default, bool):
            kwargs["action"] = "store_false" if f.default else "store_true"
        elif isinstance(f.default, tuple):
            kwargs["action"] = "append"
            if spec.metavar:
                kwargs["metavar"] = spec.metavar
        else:
            kwargs["type"] = spec.kind or (str if f.default is None else type(f.default))
            if spec.choices:
                kwargs["choices"] = spec.choices
            if spec.metavar:
                kwargs["metavar"] = spec.metavar
        group.add_argument(spec.flag, **kwargs)


def given_settings(args: argparse.Namespace) -> dict[str, Any]:
    """The settings the command line gave (only those), as ``RunConfig`` values."""
    given: dict[str, Any] = {}
    for f, _spec in settings():
        if f.name in vars(args):
            value = getattr(args, f.name)
            if f.name == "model" and value is None:
                continue
            given[f.name] = tuple(value) if isinstance(f.default, tuple) else value
    if getattr(args, "verbose", False):
        given["verbose"] = True
    passthrough = getattr(args, "passthrough", None)
    if passthrough:
        given["vllm_args"] = tuple(passthrough)
    return given


def _declared_value(value: Any) -> SettingValue | None:
    if value is None:
        return None
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, tuple):
        return list(value)
    assert isinstance(value, str | int | float | bool)
    return value


def declared_settings(config: RunConfig, *, kbs_ca_pem: str | None) -> dict[str, SettingValue]:
    """The init-data's ``[settings]`` table for ``config``: every attested setting that has a value.

    ``kbs_ca_pem`` is the text of the pinned KBS CA (declared in place of the file's path).
    """
    table: dict[str, SettingValue] = {}
    for f, spec in settings():
        if not spec.attested or not spec.in_initdata:
            continue
        where, key = declared_name(f.name, spec)
        if where != "settings":
            continue
        value = kbs_ca_pem if f.name == "kbs_cacert" else _declared_value(getattr(config, f.name))
        if value is not None:
            table[key] = value
    return table


def read_bounded(path: Path, what: str, limit: int = _MAX_CA_BUNDLE) -> bytes:
    """Read a file the host supplies, at most ``limit`` bytes.

    Raises:
        ConfigError: unreadable (the path only in ``log_detail``) or larger than ``limit``.
    """
    try:
        with path.open("rb") as f:
            data = f.read(limit + 1)
    except OSError as exc:
        raise ConfigError(f"cannot read {what}", log_detail=f"{path}: {exc.strerror}") from None
    if len(data) > limit:
        raise ConfigError(f"{what} is larger than {limit >> 20} MiB")
    return data


def _read_text(path: Path, what: str) -> str:
    data = read_bounded(path, what)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise ConfigError(f"{what} is not UTF-8 text") from None


def read_ca_bundle(path: Path) -> str:
    """Read a PEM CA bundle (``--kbs-cacert``), bounded.

    Raises:
        ConfigError: unreadable, larger than 1 MiB, or not PEM certificates.
    """
    text = _read_text(path, "the KBS CA certificate (--kbs-cacert)")
    if "-----BEGIN CERTIFICATE-----" not in text:
        raise ConfigError("the KBS CA certificate (--kbs-cacert) is not a PEM CA certificate bundle")
    return text


def _typed(name: str, f: dataclasses.Field[Any], spec: Setting, raw: SettingValue) -> Any:
    """Convert a declared value to the field's type, or refuse it."""
    what = f"init-data {ENCLAVE_SERVE_ENTRY}: setting {declared_name(name, spec)[1]}"
    default = f.default
    kind = type(default) if default is not None else (spec.kind or str)
    if isinstance(default, bool):
        if not isinstance(raw, bool):
            raise ConfigError(f"{what} must be true or false")
        return raw
    if isinstance(default, tuple):
        if not isinstance(raw, list):
            raise ConfigError(f"{what} must be a list of strings")
        return tuple(raw)
    if kind is float:
        if isinstance(raw, bool) or not isinstance(raw, int | float):
            raise ConfigError(f"{what} must be a number")
        return float(raw)
    if kind is int:
        if isinstance(raw, bool) or not isinstance(raw, int):
            raise ConfigError(f"{what} must be an integer")
        return raw
    if not isinstance(raw, str):
        raise ConfigError(f"{what} must be a string")
    if spec.choices and raw not in spec.choices:
        raise ConfigError(f"{what} must be one of {', '.join(spec.choices)}, not {raw!r}")
    return Path(raw) if kind is Path or isinstance(default, Path) else raw


def _shown(value: Any) -> str:
    if isinstance(value, tuple | list):
        return " ".join(map(str, value)) or "(none)"
    if value is None:
        return "(not set)"
    return str(value).lower() if isinstance(value, bool) else str(value)


def resolve(given: Mapping[str, Any], init: InitData | None) -> tuple[RunConfig, WorkloadPins | None]:
    """Return the configuration to run: from the command line alone, or from the init-data.

    Without init-data, ``given`` over :class:`RunConfig`'s defaults (development: claimed as the
    insecure mode "configuration not pinned by init-data"). With it, every attested setting comes
    from the init-data's declaration (a nullable setting it does not declare is null, never the
    image's default); ``given`` may only repeat a declared value or set an operational one.

    Raises:
        ConfigError: the init-data declares no or an unknown setting, a value of the wrong type,
            or the command line gives a value other than the one pinned (both named).
    """
    if init is None:
        config = RunConfig(**given)
        _check_urls(config, from_initdata=False)
        return config, None
    try:
        pins = init.pins
    except Exception as exc:
        raise ConfigError(str(exc)) from exc
    if pins is None:
        raise ConfigError(
            f"the init-data has no {ENCLAVE_SERVE_ENTRY} entry: make it with 'enclave-serve initdata'"
        )
    known = {declared_name(f.name, s)[1] for f, s in settings() if s.attested and s.in_initdata}
    unknown = sorted(set(pins.settings) - known)
    if unknown:
        raise ConfigError(
            f"the init-data declares setting(s) this runtime does not have: {', '.join(unknown)} "
            "(made for another enclave-serve version?)"
        )
    values: dict[str, Any] = {}
    refused: list[str] = []
    for f, spec in settings():
        name = f.name
        if not spec.attested:
            if name in given:
                values[name] = given[name]
            continue
        if not spec.in_initdata:
            if name in given:
                values[name] = given[name]  # RunConfig.validate refuses it beside --init-data
            continue
        _where, key = declared_name(name, spec)
        if name == "kbs_cacert":
            pinned_pem = pins.settings.get(key)
            if name in given:
                text = read_ca_bundle(given[name])
                if text != pinned_pem:
                    refused.append(
                        f"--kbs-cacert: the init-data pins "
                        f"{'another CA bundle' if pinned_pem else 'no KBS CA'}, the command line gives "
                        "a different one"
                    )
            continue  # the PEM itself is read from the pins at the config stage
        if name == "key_id":
            pinned: Any = pins.key_resource
        elif name == "vllm_args":
            pinned = tuple(pins.vllm_args)
        elif key in pins.settings:
            pinned = _typed(name, f, spec, pins.settings[key])
        elif f.default is None:
            pinned = None
        else:
            raise ConfigError(
                f"the init-data declares no value for {key} ({_flag(name, spec)}): make it again "
                "with 'enclave-serve initdata'"
            )
        values[name] = pinned
        if name in given and _declared_value(given[name]) != _declared_value(pinned):
            refused.append(
                f"{_flag(name, spec)}: the init-data pins {_shown(pinned)}, the command line gives "
                f"{_shown(given[name])}"
            )
    if refused:
        raise ConfigError(
            "the command line sets what the init-data pins: "
            + "; ".join(refused)
            + ". Remove the option (the init-data decides), or make a new init-data"
        )
    config = RunConfig(**values)
    _check_urls(config, from_initdata=True)
    return config, pins


#: The URL settings checked when the settings are resolved: (field, service named in messages).
_URL_SETTINGS = (("kbs_url", "KBS"), ("cdh_url", "CDH"))


def _check_urls(config: RunConfig, *, from_initdata: bool) -> None:
    """Refuse a service URL that is not ``http(s)://host[:port]`` now, not when it is first used.

    Raises:
        ConfigError: the URL has no or another scheme, no host, a bad port, a query or fragment;
            the message names the option (and, from an init-data, the declared setting).
    """
    from attest.kbs.http import check_base_url  # not at import: the client-only CLI has no KBS client

    fields = {f.name: spec for f, spec in settings()}
    for name, what in _URL_SETTINGS:
        value = getattr(config, name)
        if value is None:
            continue
        spec = fields[name]
        where = _flag(name, spec)
        if from_initdata and spec.attested:
            where = f"{where}, init-data setting {declared_name(name, spec)[1]}"
        problem = check_base_url(str(value), what=what, setting=where)
        if problem:
            raise ConfigError(problem)


def markdown_table() -> str:
    """The settings table of docs/configuration.md: option, attested or operational (why), default."""
    rows = ["| setting | attested | default |", "| --- | --- | --- |"]
    for f, spec in settings():
        if spec.attested:
            where, key = declared_name(f.name, spec)
            status = f"yes: `{'[settings] ' if where else ''}{key}`"
            if not spec.in_initdata:
                status = "yes: claimed as an insecure mode (never in an init-data)"
        else:
            status = f"no: {spec.operational}"
        name = _flag(f.name, spec) if f.name != "verbose" else "-v, --verbose"
        default = str(f.default).lower() if isinstance(f.default, bool) else _default_text(f)
        rows.append(f"| `{name}` | {status} | {default or '—'} |")
    return "\n".join(rows) + "\n"


if __name__ == "__main__":
    print(markdown_table(), end="")
