"""Plain-data pieces of the cloud seam: node names and tags, handles stored with worker rows, the SSH key."""

from __future__ import annotations

import stat
from pathlib import Path

from cloudmodal.ids import new_id
from cloudmodal.pricing.offers import Offer
from cloudmodal.providers.base import LaunchRequest, WorkerHandle
from cloudmodal.providers.cloud import ensure_ssh_key
from cloudmodal.providers.nodes import (
    TAG_APP,
    TAG_CONTROL_PLANE,
    TAG_FUNCTION,
    TAG_WORKER,
    NodeRef,
    node_name,
    node_tags,
    parse_node_name,
    worker_key,
)

OFFER = Offer("aws", "us-east-1", "use1-az1", "p5.48xlarge", "H100", 8, 80, 192, 2048, 55.04, 12.5, "t", "d")


def test_a_node_name_says_whose_node_it_is() -> None:
    cp, wid = new_id("cp"), new_id("ta")
    name = node_name(cp, wid)
    assert name == name.lower() and len(name) <= 42  # a GCP name with SkyPilot's suffix; Lambda's too
    assert parse_node_name(name, cp) == worker_key(wid)
    assert parse_node_name(name + "-head", cp) == worker_key(wid)  # SkyPilot's head-node suffix
    assert parse_node_name(name, new_id("cp")) is None  # another control plane's node
    assert parse_node_name("sky-1234-someone", cp) is None


def test_tags_name_the_control_plane_app_function_and_worker() -> None:
    req = LaunchRequest(worker_id="ta-X", app_id="ap-1", function_id="fu-1")
    assert node_tags("cp-1", req) == {
        TAG_CONTROL_PLANE: "cp-1",
        TAG_APP: "ap-1",
        TAG_FUNCTION: "fu-1",
        TAG_WORKER: "ta-X",
    }


def test_a_handle_survives_its_trip_through_the_database() -> None:
    ref = NodeRef("aws", "us-east-1", "use1-az1", "cm-1-ta", "i-1")
    h = WorkerHandle("ta-1", "aws", "i-1", OFFER, "spot", 12.5, 100.0, (0, 1), {"node": ref.to_wire()})
    back = WorkerHandle.from_wire(h.to_wire())
    assert back == h
    assert NodeRef.from_wire(back.extra["node"]) == ref
    assert back.offer.key("spot") == OFFER.key("spot")  # blocked-offer bookkeeping works on adopted workers


def test_a_handle_without_a_catalog_offer_keeps_what_it_had() -> None:
    h = WorkerHandle("ta-1", "local", "123", None, "on-demand", 0.0, 1.0)
    assert WorkerHandle.from_wire(h.to_wire()) == h


def test_the_ssh_key_is_private_and_made_once(tmp_path: Path) -> None:
    path, public = ensure_ssh_key(tmp_path / "ssh" / "id_ed25519")
    assert public.startswith("ssh-ed25519 ") and public.endswith(" cloudmodal")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert path.read_text().startswith("-----BEGIN OPENSSH PRIVATE KEY-----")
    assert ensure_ssh_key(path) == (path, public)
