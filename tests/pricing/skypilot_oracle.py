"""SkyPilot's optimizer as a price oracle, run as a script in a subprocess of its own.

``python skypilot_oracle.py CATALOG_DIR OUT.json`` reads a JSON list of cases on stdin, each
``{"id": str, "resources": [{"accelerators": {sky name: count}, "cloud": "aws" | ... | null, "zone": str | null},
...]}`` (SkyPilot's *set* of resources: the cheapest of them, on demand), and writes one JSON object ``{id: result}`` to ``OUT.json`` (SkyPilot prints its own progress on stdout), each result
``{"price": $/h, "cloud", "region", "zone", "instance_type", "accelerators"}`` or ``{"error": "..."}``.

It follows the checked recipe of ``../shared/TESTING.md`` (SkyPilot 0.14.1; private seams, pin the version):
the caller gives this process a sandbox ``HOME`` (SkyPilot reads it when imported); the catalog is copied to
``$HOME/.sky/catalogs/v8`` without ``.meta`` checksums, so it is never downloaded again; the clouds are marked
enabled in SkyPilot's local state; the AWS zone-id mapping (which shells out to the AWS CLI) is the identity.
Every case runs in this one process, so ``sky`` is imported once.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path
from typing import Any

SKY_CLOUD_NAMES = {"aws": "AWS", "gcp": "GCP", "azure": "Azure", "lambda": "Lambda"}


def _prepare_home(catalog_dir: Path) -> None:
    """Copy the catalog where SkyPilot looks for its cache; refuse to run outside a sandbox HOME."""
    home = Path(os.environ["HOME"])
    if not os.environ.get("CLOUDMODAL_ORACLE_SANDBOX"):
        raise SystemExit("refusing to run without CLOUDMODAL_ORACLE_SANDBOX=1 (HOME must be a sandbox)")
    target = home / ".sky" / "catalogs" / "v8"
    if not target.exists():
        shutil.copytree(catalog_dir, target)


def _enable_clouds(clouds: list[str]) -> None:
    """Mark ``clouds`` enabled for compute in SkyPilot's local state (what `sky check` would record)."""
    from sky import check as sky_check
    from sky import global_user_state, skypilot_config
    from sky.clouds import cloud as sky_cloud

    ws = skypilot_config.get_active_workspace()
    # The allowed list must equal what the config allows, or SkyPilot re-runs `sky check` (which fails here).
    global_user_state.set_allowed_clouds(sky_check._get_workspace_allowed_clouds(ws), ws)
    global_user_state.set_enabled_clouds(
        [SKY_CLOUD_NAMES[c] for c in clouds], sky_cloud.CloudCapability.COMPUTE, ws
    )


def _patch_aws_zone_mapping() -> None:
    from sky.catalog import aws_catalog

    aws_catalog._fetch_and_apply_az_mapping = lambda df: df  # no AWS CLI, no account: zone ids as they are


def _optimize(case: dict[str, Any]) -> dict[str, Any]:
    import sky
    from sky import exceptions
    from sky.utils import dag_utils

    resources = {
        sky.Resources(
            cloud=sky.CLOUD_REGISTRY.from_str(r["cloud"]) if r.get("cloud") else None,
            zone=r.get("zone"),
            accelerators=r["accelerators"],
            use_spot=False,
        )
        for r in case["resources"]
    }
    task = sky.Task(run="true")
    task.set_resources(resources)
    dag = dag_utils.convert_entrypoint_to_dag(task)
    try:
        sky.Optimizer.optimize(dag, quiet=True)
    except (exceptions.ResourcesUnavailableError, exceptions.NoCloudAccessError) as e:
        return {"error": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"}
    best = dag.tasks[0].best_resources
    assert best is not None
    return {
        "price": float(best.get_cost(3600)),
        "cloud": str(best.cloud).lower(),
        "region": best.region,
        "zone": best.zone,
        "instance_type": best.instance_type,
        "accelerators": best.accelerators,
    }


def main() -> None:
    catalog_dir = Path(sys.argv[1])
    cases = json.load(sys.stdin)
    _prepare_home(catalog_dir)
    import sky  # noqa: F401 - imported after HOME is set: SkyPilot reads it at import

    _enable_clouds(list(SKY_CLOUD_NAMES))
    _patch_aws_zone_mapping()
    out = {c["id"]: _optimize(c) for c in cases}
    Path(sys.argv[2]).write_text(json.dumps(out), encoding="utf-8")


if __name__ == "__main__":
    main()
