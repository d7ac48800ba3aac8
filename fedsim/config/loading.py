"""Configs from TOML files, ``--set`` overrides, mappings and Flower's run config.

Every entry point ends in ``parse_config``, so all of them validate alike and report the
first bad key in one line that says what to do instead.
"""

from __future__ import annotations

import difflib
import json
import re
import tomllib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Union

from pydantic import ValidationError

from fedsim.config.checks import BUDGETS, check_budget, check_deployment
from fedsim.config.schema import FedsimConfig
from fedsim.errors import FedsimError
from fedsim.registry import HUB_PREFIX

PARTS = ("model", "dataset", "partition", "strategy")  # keys that take "module:attr"


def parse_config(values: dict[str, Any]) -> FedsimConfig:
    """Validate a flat kebab-case mapping into a config.

    Raises
    ------
    FedsimError
        One line naming the first bad key, what is wrong, and what to do instead.

    """
    unknown = [key for key in values if key not in _KEYS]
    if unknown:
        raise FedsimError(_unknown_key_message(unknown[0]))
    try:
        return FedsimConfig.model_validate(values)
    except ValidationError as exc:
        raise FedsimError(_format_error(exc)) from None


ConfigLike = Union["FedsimConfig", Mapping[str, Any], str, Path, None]


def deploy_config(
    values: Mapping[str, Any], num_nodes: int | None, node_data_dirs: Sequence[object] = ()
) -> FedsimConfig:
    """The run's config from unvalidated ``values``; ``num_nodes`` sets ``num-clients``.

    ``num_nodes`` not given: one node per ``node_data_dirs`` folder, where there are any.
    Where ``clients-per-round`` is not given, it is lowered to ``num_nodes`` if needed.
    ``secure-noise`` is on unless given, and refused if turned off: the server must not
    know its clients' noise.
    """
    if num_nodes is None and node_data_dirs:
        num_nodes = len(node_data_dirs)
    if num_nodes is not None and num_nodes < 1:
        raise FedsimError(f"--num-nodes must be at least 1, got {num_nodes}")
    values = {"secure-noise": True} | dict(values)
    if num_nodes is not None:
        if values.get("num-clients", num_nodes) != num_nodes:
            raise FedsimError(
                f"--num-nodes {num_nodes} disagrees with num-clients={values['num-clients']}; "
                f"give only one of them (with a config that sets num-clients: --set "
                f"num-clients={num_nodes})"
            )
        values["num-clients"] = num_nodes
        default = FedsimConfig.model_fields["clients_per_round"].default
        values.setdefault("clients-per-round", min(default, num_nodes))
    return rooted(check_deployment(parse_config(values)))  # its apps run in other folders


def rooted(config: FedsimConfig) -> FedsimConfig:
    """``config`` with an absolute data-dir (a hub dataset's ``hf:`` name stays as it is).

    A run's processes, and a resume started in another folder, then read the same files,
    and the run's record says which.
    """
    raw = config.data_dir
    if not raw or raw.startswith(HUB_PREFIX):
        return config
    return config.model_copy(update={"data_dir": str(Path(raw).expanduser().resolve())})


def as_config(config: ConfigLike = None, **overrides: Any) -> FedsimConfig:
    """A validated config from a config, a mapping, a TOML file's path, or the defaults.

    ``overrides`` are keys as Python names (``num_rounds=3``); a mapping's keys may be
    kebab-case or Python names. The whole result is validated again.
    """
    return parse_config(config_mapping(config, **overrides))


def config_mapping(config: ConfigLike = None, **overrides: Any) -> dict[str, Any]:
    """The unvalidated kebab-case ``{key: value}`` of what :func:`as_config` takes."""
    if isinstance(config, FedsimConfig):
        values = config.to_flat()
    elif isinstance(config, str | Path):
        values = read_toml(Path(config))
    else:
        values = dict(config or {})
    flat = layered(
        *({key.replace("_", "-"): v for key, v in d.items()} for d in (values, overrides))
    )
    return {key: _named(key, value) if key in PARTS else value for key, value in flat.items()}


def layered(*layers: Mapping[str, Any]) -> dict[str, Any]:
    """``layers`` (earliest first) merged, later keys winning, with σ and budget checked.

    A budget that a later layer's σ overrides (a fixed σ over a shipped config's budget)
    is left out, so that the merged mapping holds no unused budget for a later check to
    refuse. A layer that holds every key is a resolved config (``to_flat``, a run's
    ``summary.json``): it keeps the budget its σ was solved from.
    """
    resolved = [set(layer) >= _KEYS for layer in layers]
    check_budget(*({k: layer[k] for k in BUDGETS} if whole else layer
                   for layer, whole in zip(layers, resolved, strict=True)))  # fmt: skip
    merged = {key: value for layer in layers for key, value in layer.items()}
    for sigma, budget in BUDGETS.items():
        setters = [i for i, layer in enumerate(layers) if sigma in layer]
        if setters and merged[sigma] and not resolved[setters[-1]]:
            merged.pop(budget, None)  # checked above: it came before this σ
    return merged


def _named(key: str, value: Any) -> Any:
    """A class or function given for ``key`` as its ``"module:attr"`` import path.

    Parts are imported by name in every process that needs them (Ray's workers,
    SuperNodes), so one defined in the script itself (``__main__``) or inside a function
    cannot be named; it is refused with what to do instead.
    """
    if isinstance(value, str) or not callable(value) or not hasattr(value, "__qualname__"):
        return value
    module, name = getattr(value, "__module__", None), value.__qualname__
    if module in (None, "__main__") or "<" in name:
        raise FedsimError(
            f"config: {key}: {name} is defined in {'the script you run' if module else 'no module'}"
            f"{' (inside a function)' if '<' in name else ''}, which the other processes "
            "cannot import by name; define it at the top of a module of its own (say "
            f"mine.py) and pass it, or the string 'mine:{name.rsplit('.', 1)[-1]}'"
        )
    return f"{module}:{name}"


def key_table() -> list[tuple[str, str, str]]:
    """(key, default, meaning) of every config key, in schema order."""
    return [
        (field.alias or name, toml_literal(field.default), field.description or "")
        for name, field in FedsimConfig.model_fields.items()
    ]


def toml_literal(value: Any) -> str:
    """``value`` as a TOML literal: what ``--set`` and run-config files hold."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value)  # a JSON string is a valid TOML basic string
    return repr(value)


def toml_table(values: Mapping[str, Any]) -> str:
    """A flat TOML table of ``values``."""
    return "".join(f"{key} = {toml_literal(value)}\n" for key, value in values.items())


def load_config(path: Path | None = None, overrides: list[str] | None = None) -> FedsimConfig:
    """Read an optional TOML file, apply ``KEY=VALUE`` overrides, and validate.

    Parameters
    ----------
    path
        A TOML file of kebab-case keys, flat or under ``[tool.flwr.app.config]``.
    overrides
        ``KEY=VALUE`` strings; values are TOML literals, or plain strings otherwise.

    """
    return parse_config(config_values(path, overrides))


def config_values(path: Path | None, overrides: list[str] | None) -> dict[str, Any]:
    """The unvalidated ``{key: value}`` of an optional TOML file and ``KEY=VALUE`` overrides.

    One override may hold several pairs, as Flower's ``--run-config`` does:
    ``"num-rounds=3 data-dir='/my data'"``.
    """
    values: dict[str, Any] = read_toml(path) if path is not None else {}
    given: dict[str, Any] = {}
    for item in overrides or []:
        given.update(parse_override(pair) for pair in _pairs(item))
    return layered(values, given)


_PAIR = r"""[^\s=]+=(?:"[^"]*"|'[^']*'|\S*)"""


def _pairs(item: str) -> list[str]:
    """``KEY=VALUE`` pairs of one override; quoted values may hold spaces."""
    if re.fullmatch(rf"\s*(?:{_PAIR}\s*)+", item):
        return re.findall(_PAIR, item)
    return [item]  # not a list of pairs: parse_override says what is wrong with it


def read_toml(path: Path) -> dict[str, Any]:
    """Read a config file; Flower's pyproject layout is accepted too."""
    if path.is_dir():
        raise FedsimError(f"config file {path} is a folder; pass a .toml file")
    if not path.is_file():
        raise FedsimError(f"config file {path} does not exist; pass an existing .toml file")
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise FedsimError(f"config file {path} is not valid TOML: {exc}") from None
    return _app_config(path, data)


def _app_config(path: Path, data: dict[str, Any]) -> dict[str, Any]:
    """A Flower pyproject's ``[tool.flwr.app.config]`` table, or else the file's keys."""
    table: Any = data
    for level in ("tool", "flwr", "app"):
        table = table.get(level) if isinstance(table, dict) else None
    if not isinstance(table, dict) or "config" not in table:
        return data  # a flat config: a stray `tool` is then an unknown key
    if not isinstance(table["config"], dict):
        raise FedsimError(
            f"config file {path}: tool.flwr.app.config is {toml_literal(table['config'])}, "
            "not a table; put the config keys under a [tool.flwr.app.config] header"
        )
    return dict(table["config"])


def parse_override(item: str, flag: str = "--set") -> tuple[str, Any]:
    """Split ``KEY=VALUE``; ``VALUE`` is a TOML literal (1, 0.5, true) or a bare string.

    ``flag``: the option that gave it, for the error (``--grid`` takes ``KEY=V1,V2``).
    """
    key, sep, raw = item.partition("=")
    key = key.strip()
    if not sep or not key:
        example = "num-rounds=5" if flag == "--set" else "lr=0.1,0.5"
        raise FedsimError(f"{flag} expects KEY=VALUE, got '{item}'; for example {flag} {example}")
    try:
        value = tomllib.loads(f"v = {raw.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw.strip()
    return key, value


_KEYS = {field.alias or name for name, field in FedsimConfig.model_fields.items()}


def _unknown_key_message(key: str) -> str:
    close = difflib.get_close_matches(key, sorted(_KEYS), n=1)
    hint = f"did you mean '{close[0]}'?" if close else f"known keys: {', '.join(sorted(_KEYS))}"
    return f"config: unknown key '{key}'; {hint}"


_DEFAULTS = {
    field.alias or name: field.default for name, field in FedsimConfig.model_fields.items()
}
# pydantic's strict type errors, as what a TOML value should have been
_EXPECTED = {
    "int_type": "a whole number",
    "float_type": "a number",
    "bool_type": "true or false",
    "string_type": "a string",
}
_KINDS: dict[type, str] = {
    bool: "a boolean",
    int: "a whole number",
    float: "a number",
    str: "a string",
    dict: "a table",
    list: "an array",
}


def _format_error(exc: ValidationError) -> str:
    error = exc.errors()[0]
    key = ".".join(str(part) for part in error["loc"]) or "config"
    if error["type"] in _EXPECTED and key in _DEFAULTS:
        return _type_message(key, _EXPECTED[error["type"]], error["input"])
    if error["type"] in _BOUNDS and key in _DEFAULTS:
        sign, bound = _BOUNDS[error["type"]], next(iter(error["ctx"].values()))
        return (
            f"config: {key}: must be {sign} {bound}, got {toml_literal(error['input'])}; "
            f"for example {key} = {toml_literal(_DEFAULTS[key])} (the default)"
        )
    if error["type"] == "literal_error" and isinstance(error["input"], str):
        choices = re.findall(r"'([^']*)'", error["ctx"]["expected"])
        near = [c for c in choices if c.lower() == error["input"].lower()]
        hint = f"; did you mean '{near[0]}'?" if near else ""
        return f"config: {key}: {error['input']!r} is not one of {', '.join(choices)}{hint}"
    if error["type"] == "string_pattern_mismatch":  # name: it becomes a folder's name
        fixed = json.dumps(re.sub(r"[^A-Za-z0-9._-]+", "-", error["input"]))
        return (
            f"config: {key}: {error['input']!r} may hold only letters, digits, '.', '_' and "
            f"'-'; for example {key} = {fixed}"
        )
    message = error["msg"].removeprefix("Value error, ")
    if error["loc"]:
        return f"config: {key}: {message} (got {error['input']!r})"
    return f"config: {message}"


_BOUNDS = {"greater_than": ">", "greater_than_equal": "≥", "less_than": "<", "less_than_equal": "≤"}


def _type_message(key: str, expected: str, value: Any) -> str:
    """``key`` holds a value of the wrong type: what it got, and one that would do."""
    got = f"{toml_literal(value)} ({_KINDS.get(type(value), type(value).__name__)})"
    if expected == _EXPECTED["string_type"] and isinstance(value, int | float):  # bools too
        fix = f"quote it: {key} = {json.dumps(toml_literal(value))}"
    else:
        fix = f"for example {key} = {toml_literal(_DEFAULTS[key])}"
    return f"config: {key}: expected {expected}, got {got}; {fix}"
