"""A registered model's versions: a new one from a logged model, and whether the ``champion`` alias moves to
it (only for a better mAP on the same val manifest, unless forced)."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from pipeline import names
from pipeline.registry.verify import Verification

log = logging.getLogger(__name__)
CHAMPION = "champion"


@dataclass(frozen=True)
class Target:
    """Where a version goes: the tracking store, the registered model's name, the experiment of the
    registration run (None: the source run's, else ``yolov9-registry``), and whether the alias moves
    regardless of mAP."""

    tracking_uri: str
    name: str
    experiment: str | None
    force: bool


@dataclass(frozen=True)
class Promotion:
    """Whether the alias moves to the new version, and why (printed and stored as a version tag)."""

    promote: bool
    reason: str


def decide_promotion(
    current_map: float | None,
    current_val_hash: str | None,
    new_map: float,
    new_val_hash: str,
    force: bool = False,
) -> Promotion:
    """Whether the new version takes the alias from the current champion (``current_map`` None: none yet).

    Scores are comparable only on the same val manifest: a different one never promotes unless forced.
    """
    if force:
        return Promotion(True, "promotion forced (--promote)")
    if current_map is None:
        return Promotion(True, "no champion yet")
    if current_val_hash != new_val_hash:
        return Promotion(
            False,
            f"not promoted: the champion was measured on val manifest {current_val_hash}, "
            f"this version on {new_val_hash}; mAPs are not comparable (use --promote)",
        )
    if new_map > current_map:
        return Promotion(True, f"mAP@0.5:0.95 {new_map:.4f} beats the champion's {current_map:.4f}")
    return Promotion(
        False, f"not promoted: mAP@0.5:0.95 {new_map:.4f} does not beat the champion's {current_map:.4f}"
    )


def champion(client: MlflowClient, name: str) -> tuple[float | None, str | None]:
    """The current champion's mAP@0.5:0.95 and val manifest hash; (None, None) when there is none."""
    try:
        current = client.get_model_version_by_alias(name, CHAMPION)
    except MlflowException:
        return None, None  # no registered model yet, or no version holds the alias
    return float(current.tags.get(names.VERSION_MAP_TAG, "-1")), current.tags.get(names.VAL_MANIFEST_HASH_TAG)


def new_version(
    client: MlflowClient,
    target: Target,
    info: Any,
    run_id: str,
    tags: dict[str, str],
    verification: Verification,
) -> tuple[Any, Promotion]:
    """A new version of ``target.name`` from the logged model ``info``; the champion alias moves to it
    when :func:`decide_promotion` says so."""
    current_map, current_hash = champion(client, target.name)
    try:
        client.create_registered_model(target.name)
    except MlflowException as e:
        if e.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
    decision = decide_promotion(
        current_map, current_hash, verification.map50_95, tags[names.VAL_MANIFEST_HASH_TAG], target.force
    )
    # model_id: an HTTP tracking server only accepts a logged-model source with its id
    version = client.create_model_version(
        target.name,
        info.model_uri,
        run_id=run_id,
        tags={**tags, names.PROMOTION_TAG: decision.reason},
        model_id=info.model_id,
    )
    if decision.promote:
        client.set_registered_model_alias(target.name, CHAMPION, version.version)
    log.info("%s version %s: %s", target.name, version.version, decision.reason)
    return version, decision
