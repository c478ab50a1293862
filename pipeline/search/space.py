"""A search's space: the ``tune.space`` of a config as Ray Tune domains (every key checked against the
config), the training config of one trial, and the record of the space a search started with."""

from __future__ import annotations

import json
from typing import Any

import yaml
from ray import tune

from pipeline import storage
from pipeline.config import Config, ConfigError, apply_overrides, config_from_dict
from pipeline.errors import PipelineError

SPACE_FILE = "search_space.json"  # in the search's folder: the tune.space it started with
DEFAULT_SPACE: dict[str, dict[str, list]] = {
    "loss.aux_weight": {"uniform": [0.1, 1.0]},
    "loss.lead_weight": {"uniform": [0.25, 1.0]},
    "loss.tal_topk": {"choice": [5, 7, 10, 13, 16]},
}
DOMAINS = {
    "uniform": tune.uniform,
    "loguniform": tune.loguniform,
    "randint": tune.randint,
    "choice": tune.choice,
    "grid": tune.grid_search,
    "arms": tune.grid_search,  # over the arms' names; trial_config applies each arm's settings
}


class SearchError(PipelineError, ValueError):
    """A search that cannot start: bad space, unknown key, no room on the cluster."""


def build_space(space: dict[str, Any], base: dict[str, Any], where: str = "tune.space") -> dict[str, Any]:
    """Ray Tune domains for ``space``; every key must name a config key (checked against ``base``)."""
    domains: dict[str, Any] = {}
    for key, spec in (space or DEFAULT_SPACE).items():
        if not isinstance(spec, dict) or len(spec) != 1 or next(iter(spec)) not in DOMAINS:
            raise SearchError(f"{where}.{key}: expected one of {{{', '.join(DOMAINS)}: [...]}}, got {spec!r}")
        ((kind, args),) = spec.items()
        if kind == "arms":
            domains[key] = tune.grid_search(list(_check_arms(args, base, f"{where}.{key}")))
            continue
        if not isinstance(args, list) or not args:
            raise SearchError(f"{where}.{key}: {kind} takes a non-empty list, got {args!r}")
        example = args[0]
        try:
            config_from_dict(apply_overrides(base, [f"{key}={yaml.safe_dump(example).strip()}"]), where)
        except ConfigError as e:
            raise SearchError(f"{where}.{key} is not a usable config key: {e}") from e
        domains[key] = DOMAINS[kind](args) if kind in ("choice", "grid") else DOMAINS[kind](*args)
    return domains


def _check_arms(arms: Any, base: dict[str, Any], where: str) -> dict[str, dict[str, Any]]:
    """``arms`` (arm name -> {config key: value}), each arm checked as a whole against ``base``."""
    if not isinstance(arms, dict) or not arms or not all(isinstance(a, dict) and a for a in arms.values()):
        raise SearchError(f"{where}: arms takes a mapping of arm name -> {{config key: value}}, got {arms!r}")
    for name, settings in arms.items():
        try:
            config_from_dict(apply_overrides(base, _overrides(settings)), where)
        except ConfigError as e:
            raise SearchError(f"{where}.{name}: {e}") from e
    return arms


def _overrides(settings: dict[str, Any]) -> list[str]:
    return [f"{k}={yaml.safe_dump(v).strip()}" for k, v in settings.items()]


def trial_config(base: dict[str, Any], params: dict[str, Any], run_name: str) -> Config:
    """The training config of one trial: the base with the sampled ``params`` set (an ``arms`` key's
    value: that arm's settings)."""
    space = base.get("tune", {}).get("space") or {}
    settings: dict[str, Any] = {}
    for key, value in params.items():
        arms = space.get(key, {}).get("arms")
        settings.update(arms[value] if arms is not None else {key: value})
    return config_from_dict(
        apply_overrides(base, [*_overrides(settings), f"ray.run_name={run_name}"]), "trial"
    )


def space_record(cfg: Config) -> dict[str, Any]:
    """The search space as a search records it when it starts (``SPACE_FILE`` in its folder): plain JSON."""
    return json.loads(json.dumps(cfg.tune.space or DEFAULT_SPACE, sort_keys=True))


def check_same_space(cfg: Config, path: str) -> None:
    """A rerun resumes the search in ``path`` only with the space it started with: Ray's restore checks
    the searched keys alone (and raises a ValueError from deep inside), and new ranges or choices would
    mix trials of two searches in one table. Searches started before the record existed are not checked."""
    recorded = storage.locate(path, SPACE_FILE)
    if not storage.is_file(recorded):
        return
    before, now = json.loads(storage.read_bytes(recorded)), space_record(cfg)
    if before == now:
        return
    changed = [
        f"{key}: {json.dumps(before.get(key))} -> {json.dumps(now.get(key))}"
        for key in sorted(before.keys() | now.keys())
        if before.get(key) != now.get(key)
    ]
    raise SearchError(
        f"search {cfg.tune.name} in {path} started with another tune.space ({'; '.join(changed)}); a rerun "
        f"resumes it only with the same space: give this search a new tune.name, or remove {path} to start "
        f"{cfg.tune.name} afresh (its trials' MLflow runs stay)"
    )
