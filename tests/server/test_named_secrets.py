"""Named secrets in the control plane's service (no HTTP): create/list/update/delete with Modal's semantics,
who may manage them, encryption at rest, the check of a function's declared secrets at registration, and the
values a launch resolves. On SQLite and PostgreSQL."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import select
from support import bare_plane

from cloudmodal.exception import AlreadyExistsError, InvalidError, NotFoundError, PermissionDeniedError
from cloudmodal.secret import Secret
from cloudmodal.server.models_secrets import named_secrets
from cloudmodal.server.security import Identity
from cloudmodal.server.service import ControlPlane
from cloudmodal.server.svc_secrets import MAX_VALUE_CHARS, NamedSecrets, declared_named
from cloudmodal.spec import FunctionSpec

APP = "ap-secrets"
OWNER = Identity("owner", "tk-owner", "owner")
TEAM = Identity("member", "tk-team", "member")
SCOPED = Identity("member", "tk-scoped", "member:other", apps=frozenset({"other"}))
WORKER = Identity("worker", "worker:ta-1", "worker:ta-1", worker_id="ta-1")
VALUE = "s3cr3t-value-9f1c2b7e"  # distinctive: searched for in the stored row
OTHER = "rotated-value-42aa7d"


@pytest.fixture
def cp(database_url: str, tmp_path: Path) -> Iterator[ControlPlane]:
    with bare_plane(tmp_path, database_url, APP) as plane:
        yield plane


@pytest.fixture
def ns(cp: ControlPlane) -> NamedSecrets:
    return NamedSecrets(cp)


def _stored(cp: ControlPlane) -> list[dict[str, object]]:
    with cp.db.read() as conn:
        return [dict(r._mapping) for r in conn.execute(select(named_secrets)).all()]


def test_create_list_info_update_delete(ns: NamedSecrets, cp: ControlPlane) -> None:
    made = ns.create("openai", {"API_KEY": VALUE, "ORG": "acme"}, who=OWNER)
    assert made["created"] is True and made["secret_id"].startswith("st-") and made["name"] == "openai"
    rows = ns.list(OWNER)
    assert [r["name"] for r in rows] == ["openai"]
    assert set(rows[0]) == {"id", "name", "created_at", "updated_at", "created_by", "last_used_at"}
    assert rows[0]["created_by"] == "tk-owner" and rows[0]["last_used_at"] is None
    assert ns.info("openai", TEAM)["id"] == made["secret_id"]
    assert VALUE not in repr(rows) and "API_KEY" not in repr(rows)

    # update merges: new keys added, given keys replaced, the others kept
    assert ns.update("openai", {"ORG": "other", "EXTRA": "1"}, who=TEAM)["keys"] == 3
    assert ns.resolve(["openai"]) == {"API_KEY": VALUE, "ORG": "other", "EXTRA": "1"}

    assert ns.delete("openai", who=OWNER) is True
    assert ns.list(OWNER) == []
    with pytest.raises(NotFoundError, match="cloudmodal secret create openai KEY=VALUE"):
        ns.delete("openai", who=OWNER)
    assert ns.delete("openai", allow_missing=True, who=OWNER) is False
    with pytest.raises(NotFoundError):
        ns.update("openai", {"A": "b"}, who=OWNER)


def test_if_exists_fail_skip_overwrite(ns: NamedSecrets) -> None:
    ns.create("db", {"URL": VALUE}, who=OWNER)
    with pytest.raises(AlreadyExistsError, match="--force"):
        ns.create("db", {"URL": OTHER}, who=OWNER)
    assert ns.create("db", {"URL": OTHER}, if_exists="skip", who=OWNER)["created"] is False
    assert ns.resolve(["db"]) == {"URL": VALUE}  # allow_existing keeps what is there
    assert ns.create("db", {"PASSWORD": OTHER}, if_exists="overwrite", who=OWNER)["created"] is False
    assert ns.resolve(["db"]) == {"PASSWORD": OTHER}  # --force replaces the values, old keys dropped


def test_values_are_encrypted_at_rest(ns: NamedSecrets, cp: ControlPlane) -> None:
    ns.create("enc", {"TOKEN_NAME_IN_CLEAR_NOT": VALUE}, who=OWNER)
    (row,) = _stored(cp)
    text = repr(row)
    assert VALUE not in text and "TOKEN_NAME_IN_CLEAR_NOT" not in text  # neither values nor key names
    assert cp.secrets.open(str(row["sealed"])) == b'{"TOKEN_NAME_IN_CLEAR_NOT":"' + VALUE.encode() + b'"}'


@pytest.mark.parametrize("who", [SCOPED, WORKER], ids=["app-scoped member", "worker"])
def test_only_owner_and_team_wide_members_manage_secrets(ns: NamedSecrets, who: Identity) -> None:
    ns.create("team", {"K": VALUE}, who=OWNER)
    for act in (
        lambda: ns.create("mine", {"K": "v"}, who=who),
        lambda: ns.list(who),
        lambda: ns.info("team", who),
        lambda: ns.update("team", {"K": "v"}, who=who),
        lambda: ns.delete("team", who=who),
        lambda: ns.check_declared(["team"], None, who),
    ):
        with pytest.raises(PermissionDeniedError, match="may not"):
            act()
    assert [r["name"] for r in ns.list(OWNER)] == ["team"]


def test_bad_input_errors_name_keys_never_values(ns: NamedSecrets) -> None:
    long = "x" * (MAX_VALUE_CHARS + 1)
    with pytest.raises(InvalidError, match="the value of BIG has") as info:
        ns.create("big", {"BIG": long}, who=OWNER)
    assert long not in str(info.value)
    for key in ("1ABC", "HAS SPACE", "A=B", "", "KEY\n"):
        with pytest.raises(InvalidError, match="invalid key") as info:
            ns.create("bad", {key: VALUE}, who=OWNER)
        assert VALUE not in str(info.value)
    with pytest.raises(InvalidError, match="must be a string") as info:
        ns.create("bad", {"N": 12345}, who=OWNER)
    assert "12345" not in str(info.value)
    with pytest.raises(InvalidError, match="reserved for inline secrets"):
        ns.create("inline-0123456789abcdef", {"A": "b"}, who=OWNER)
    with pytest.raises(InvalidError, match="Invalid Secret name"):
        ns.create("no/slash", {"A": "b"}, who=OWNER)
    assert ns.list(OWNER) == []


def test_check_declared_names_the_missing_secret_and_keys(ns: NamedSecrets, cp: ControlPlane) -> None:
    ns.create("present", {"A": VALUE}, who=OWNER)
    with pytest.raises(NotFoundError) as info:
        ns.check_declared(["present", "absent"], None, OWNER, where="Function 'f': ")
    assert str(info.value).startswith("Function 'f': Secret 'absent' not found.")
    assert "`cloudmodal secret create absent KEY=VALUE`" in str(info.value)
    with pytest.raises(NotFoundError, match="missing required key\\(s\\) B, C") as info:
        ns.check_declared(["present"], {"present": ["A", "C", "B"]}, OWNER)
    assert VALUE not in str(info.value)
    ns.check_declared(["present"], {"present": ["A"]}, OWNER)
    assert ns.info("present", OWNER)["last_used_at"] is None  # used: handed to a worker, not checked


def test_resolve_merges_in_order_reads_current_values_and_marks_use(ns: NamedSecrets) -> None:
    ns.create("one", {"A": "1", "SHARED": "from-one"}, who=OWNER)
    ns.create("two", {"B": "2", "SHARED": "from-two"}, who=OWNER)
    assert ns.resolve(["one", "two"]) == {"A": "1", "B": "2", "SHARED": "from-two"}
    assert ns.resolve(["two", "one"])["SHARED"] == "from-one"
    used = ns.info("one", OWNER)["last_used_at"]
    assert used is not None
    ns.update("one", {"A": OTHER}, who=OWNER)
    assert ns.resolve(["one"])["A"] == OTHER  # a rotated value reaches the next launch
    with pytest.raises(NotFoundError, match="'three' not found"):
        ns.resolve(["one", "three"])


def test_reseal_all_after_a_key_rotation(ns: NamedSecrets, cp: ControlPlane) -> None:
    ns.create("r", {"A": VALUE}, who=OWNER)
    before = _stored(cp)[0]["sealed"]
    assert ns.reseal_all() == 1
    after = _stored(cp)[0]["sealed"]
    assert after != before and ns.resolve(["r"]) == {"A": VALUE}


# -- a function's declared secrets at registration ------------------------------------------------------
def _fn_body(name: str, secrets: list[str], **extra: object) -> dict[str, object]:
    spec = FunctionSpec(name=name, module="m", qualname=name, secrets=tuple(secrets)).to_wire()
    return {"app_id": APP, "name": name, "spec": spec, **extra}


def test_registration_checks_named_secrets_but_not_inline_ones(ns: NamedSecrets, cp: ControlPlane) -> None:
    inline = Secret.from_dict({"X": "y"}).name
    assert declared_named([inline, "a", "b"]) == ["a", "b"]
    # inline secrets' generated names are not looked up
    cp.functions.create_function(_fn_body("inline_only", [inline]), OWNER)
    with pytest.raises(NotFoundError, match="Function 'f': Secret 'api' not found. Create it with"):
        cp.functions.create_function(_fn_body("f", [inline, "api"]), OWNER)
    ns.create("api", {"KEY": VALUE}, who=OWNER)
    assert cp.functions.create_function(_fn_body("f", [inline, "api"]), OWNER)["version"] == 1
    with pytest.raises(NotFoundError, match="missing required key\\(s\\) OTHER"):
        cp.functions.create_function(
            _fn_body("g", ["api"], secret_required_keys={"api": ["KEY", "OTHER"]}), TEAM
        )
    cp.functions.create_function(_fn_body("g", ["api"], secret_required_keys={"api": ["KEY"]}), TEAM)


def test_an_app_scoped_member_may_not_register_a_function_using_named_secrets(
    ns: NamedSecrets, cp: ControlPlane
) -> None:
    """Else it could read every secret of the team through a function of its own app."""
    ns.create("api", {"KEY": VALUE}, who=OWNER)
    scoped = Identity("member", "tk-app", f"member:{APP}", apps=frozenset({APP}))
    with pytest.raises(PermissionDeniedError, match="may not use named secrets \\('api'\\)"):
        cp.functions.create_function(_fn_body("f", ["api"]), scoped)
    # the same member registers functions without named secrets
    cp.functions.create_function(_fn_body("plain", []), scoped)
