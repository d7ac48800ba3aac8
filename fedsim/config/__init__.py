"""One typed, validated experiment config, with Flower-style kebab-case keys.

The same schema is read from a TOML file, from ``--set KEY=VALUE`` overrides, from
Flower's run config (``[tool.flwr.app.config]``) and from the config record the server
sends to clients, so every entry point validates identically before any work starts.

The package's face: ``schema.py`` (the keys, their checks as the config validates, facts
derived from the config), ``checks.py`` (checks across keys and against the dataset or
engine) and ``loading.py`` (TOML, ``--set``, mappings, error lines).
"""

from fedsim.config.checks import (
    BUDGETS,
    check_budget,
    check_delta,
    check_deployment,
    check_task,
    strategy_refusal,
)
from fedsim.config.loading import (
    ConfigLike,
    as_config,
    config_mapping,
    config_values,
    deploy_config,
    key_table,
    load_config,
    parse_config,
    parse_override,
    read_toml,
    rooted,
    toml_literal,
    toml_table,
)
from fedsim.config.schema import FedsimConfig

__all__ = [
    "BUDGETS",
    "ConfigLike",
    "FedsimConfig",
    "as_config",
    "check_budget",
    "check_delta",
    "check_deployment",
    "check_task",
    "config_mapping",
    "config_values",
    "deploy_config",
    "key_table",
    "load_config",
    "parse_config",
    "parse_override",
    "read_toml",
    "rooted",
    "strategy_refusal",
    "toml_literal",
    "toml_table",
]
