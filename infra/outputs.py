"""The outputs of ``cloudmodal infra up``, kept where the control plane reads them.

``cloudmodal infra up --cloud C`` (and ``cloudmodal infra outputs --cloud C --write``) writes
``<CLOUDMODAL_HOME>/infra/<C>.json`` (0600, in a 0700 directory)::

    {"cloud": "aws", "stack": "aws", "project": "cloudmodal", "backend": "file:///…/infra/state",
     "written_at": 1767225600.0, "config": {"region": "us-east-1", …},
     "outputs": {"bucket_url": "s3://…", "volume_store": "s3://…/volumes", …}, "secret": []}

:func:`settings_overrides` turns those files into values of :class:`cloudmodal.settings.Settings` fields
(``volume_store``, ``blob_store``, ``volume_store_region``, ``node_server_url``), which
:class:`InfraOutputsSource` feeds to the settings *below* the environment: a ``CLOUDMODAL_*`` variable always
wins over what the infrastructure says. When several clouds have outputs, the stores come from the one brought
up (or written) last; ``cloudmodal infra outputs --cloud C --write`` makes ``C`` the latest again.

This module imports neither Pulumi nor the clouds' SDKs: the settings read it in every process.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pydantic.fields import FieldInfo
from pydantic_settings import PydanticBaseSettingsSource

from cloudmodal.infra.common import (
    BLOB_PREFIX,
    CLOUDS,
    OUT_BLOB_STORE,
    OUT_BUCKET_REGION,
    OUT_BUCKET_URL,
    OUT_CONTROL_PLANE_URL,
    OUT_NETWORK,
    OUT_STORAGE_ACCOUNT,
    OUT_VOLUME_STORE,
    OUT_VOLUME_STORE_REGION,
    OUT_WORKER_IDENTITY,
    VOLUME_PREFIX,
    store_url,
)

INFRA_DIR = "infra"  # under CLOUDMODAL_HOME: the outputs files, the local state backend, the passphrase
FORMAT = 1  # the outputs file's layout


def default_home() -> Path:
    """``CLOUDMODAL_HOME`` (or ``~/.cloudmodal``), made private."""
    from cloudmodal.config import home

    return home()


def infra_dir(home: Path | None = None) -> Path:
    """``<home>/infra``, created 0700."""
    from cloudmodal.config import private_dir

    return private_dir((home or default_home()) / INFRA_DIR)


def outputs_path(cloud: str, home: Path | None = None) -> Path:
    if cloud not in CLOUDS:
        raise ValueError(f"unknown cloud {cloud!r}: use one of {', '.join(CLOUDS)}")
    return infra_dir(home) / f"{cloud}.json"


def write_outputs(
    cloud: str,
    outputs: Mapping[str, Any],
    *,
    stack: str,
    project: str,
    backend: str,
    config: Mapping[str, Any] | None = None,
    secret: tuple[str, ...] | list[str] = (),
    home: Path | None = None,
    now: float | None = None,
) -> Path:
    """Write ``cloud``'s outputs file (0600), atomically: a reader sees the old file or the new one."""
    path = outputs_path(cloud, home)
    doc = {
        "format": FORMAT,
        "cloud": cloud,
        "stack": stack,
        "project": project,
        "backend": backend,
        "written_at": time.time() if now is None else now,
        "config": dict(config or {}),
        "outputs": dict(outputs),
        "secret": sorted(secret),
    }
    data = json.dumps(doc, indent=2, sort_keys=True, default=str) + "\n"
    fd, tmp = tempfile.mkstemp(prefix=f".{cloud}.", suffix=".tmp", dir=path.parent)  # mkstemp: 0600
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def read_outputs(cloud: str, home: Path | None = None) -> dict[str, Any] | None:
    """``cloud``'s outputs file as written by :func:`write_outputs`, or None when there is none."""
    return _read(_path_no_create(cloud, home))


def remove_outputs(cloud: str, home: Path | None = None) -> bool:
    """Forget ``cloud``'s outputs (after ``destroy``); whether there was a file."""
    path = _path_no_create(cloud, home)
    try:
        path.unlink()
    except FileNotFoundError:
        return False
    return True


def _path_no_create(cloud: str, home: Path | None) -> Path:
    if cloud not in CLOUDS:
        raise ValueError(f"unknown cloud {cloud!r}: use one of {', '.join(CLOUDS)}")
    return (home or default_home()) / INFRA_DIR / f"{cloud}.json"


def _read(path: Path) -> dict[str, Any] | None:
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return None  # a torn or foreign file configures nothing (write_outputs replaces it atomically)
    if not isinstance(doc, dict) or not isinstance(doc.get("outputs"), dict):
        return None
    return doc


def all_outputs(home: Path | None = None) -> list[dict[str, Any]]:
    """Every cloud's outputs file, the latest written first (ties: in the order of ``CLOUDS``)."""
    base = (home or default_home()) / INFRA_DIR
    docs = []
    for i, cloud in enumerate(CLOUDS):
        doc = _read(base / f"{cloud}.json")
        if doc is not None:
            docs.append((-float(doc.get("written_at") or 0.0), i, doc))
    return [d for _, _, d in sorted(docs, key=lambda t: (t[0], t[1]))]


def overrides_for(cloud: str, outputs: Mapping[str, Any]) -> dict[str, str]:
    """The settings one cloud's outputs give: field name -> value (as its environment variable would)."""
    found: dict[str, str] = {}
    bucket = outputs.get(OUT_BUCKET_URL)
    volume_store = outputs.get(OUT_VOLUME_STORE) or (bucket and store_url(str(bucket), VOLUME_PREFIX))
    blob_store = outputs.get(OUT_BLOB_STORE) or (bucket and store_url(str(bucket), BLOB_PREFIX))
    region = outputs.get(OUT_VOLUME_STORE_REGION)
    if not region and outputs.get(OUT_BUCKET_REGION):
        region = f"{cloud}:{outputs[OUT_BUCKET_REGION]}"
    for field, value in (
        ("volume_store", volume_store),
        ("blob_store", blob_store),
        ("volume_store_region", region),
        ("node_server_url", outputs.get(OUT_CONTROL_PLANE_URL)),
    ):
        if value:
            found[field] = str(value)
    return found


def settings_overrides(home: Path | None = None) -> dict[str, str]:
    """What the infrastructure's outputs say the control plane should use, as Settings field -> value.

    The stores (``volume_store``, ``blob_store``, ``volume_store_region``) come together from one cloud, the
    one written last, so a volume store never pairs with another cloud's region; ``node_server_url`` comes from
    the latest cloud that made a control host."""
    found: dict[str, str] = {}
    for doc in all_outputs(home):
        mapped = overrides_for(str(doc.get("cloud")), doc["outputs"])
        if "volume_store" in mapped and "volume_store" not in found:
            for field in ("volume_store", "blob_store", "volume_store_region"):
                if field in mapped:
                    found[field] = mapped[field]
        if "node_server_url" in mapped and "node_server_url" not in found:
            found["node_server_url"] = mapped["node_server_url"]
    return found


def environment_overrides(home: Path | None = None) -> dict[str, str]:
    """Variables outside cloudmodal's settings that the stores need: Azure's storage account (obstore and
    azure-storage-blob read ``AZURE_STORAGE_ACCOUNT_NAME``), when the stores are on Azure."""
    for doc in all_outputs(home):
        outputs = doc["outputs"]
        if overrides_for(str(doc.get("cloud")), outputs).get("volume_store"):
            account = outputs.get(OUT_STORAGE_ACCOUNT)
            return {"AZURE_STORAGE_ACCOUNT_NAME": str(account)} if account else {}
    return {}


class InfraOutputsSource(PydanticBaseSettingsSource):
    """A settings source that reads :func:`settings_overrides`; place it after the environment's source in
    ``settings_customise_sources`` so that the environment wins. The state directory is the ``home`` the
    sources before it found (``CLOUDMODAL_HOME``), else ``~/.cloudmodal``; nothing is created."""

    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:
        return None, field_name, False  # __call__ reads everything at once

    def __call__(self) -> dict[str, Any]:
        home = self.current_state.get("home")
        base = Path(home) if home else Path.home() / ".cloudmodal"
        try:
            return dict(settings_overrides(base))
        except OSError:
            return {}


def driver_options(cloud: str, home: Path | None = None) -> dict[str, str]:
    """Keyword arguments for ``cloud``'s node driver (:mod:`cloudmodal.providers.nodes`) from its outputs, so
    that nodes use what the stack made. AWS: the instance profile whose role may reach only the stack's bucket
    (``instance_profile``; without outputs a node gets no AWS identity at all), the security group and the VPC.
    GCP: the service account allowed on the stack's bucket only (its nodes stay on SkyPilot's ``default``
    network: SkyPilot's bootstrap wants SSH open to the world on a VPC it is given). Azure: none yet."""
    doc = read_outputs(cloud, home) if cloud in CLOUDS else None
    if doc is None:
        return {}
    outputs = doc["outputs"]
    if cloud == "gcp":
        account = outputs.get(OUT_WORKER_IDENTITY)
        return {"service_account": account} if isinstance(account, str) and account else {}
    if cloud != "aws":
        return {}
    picked = {
        "instance_profile": outputs.get(OUT_WORKER_IDENTITY),
        "security_group": outputs.get(OUT_NETWORK),
        "vpc_name": outputs.get("vpc_name"),
    }
    return {k: str(v) for k, v in picked.items() if isinstance(v, str) and v}
