"""Virtual keys on real SQLite and real PostgreSQL: life cycle, validation, secrecy, refusals."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from tokyo_ia.errors import AuthenticationError, InvalidRequestError, NotFoundError
from tokyo_ia.security.auth import digest
from tokyo_ia.security.keys import KEY_PREFIX, KeyService
from tokyo_ia.store.models import Base

INJECTION = "x'); DROP TABLE api_keys; --"


async def test_create_returns_the_key_once_and_stores_its_settings(keys: KeyService) -> None:
    expires = datetime.now(UTC) + timedelta(days=30)
    plaintext, record = await keys.create(
        "billing-bot",
        owner="alice",
        team="payments",
        models=["gpt-4o*", "claude-?-haiku"],
        expires_at=expires,
        rpm=60,
        tpm=10_000,
        max_parallel=4,
        metadata={"ticket": "OPS-1"},
    )
    assert plaintext.startswith(KEY_PREFIX)
    assert len(plaintext) == len(KEY_PREFIX) + 43
    assert record.id.startswith("key_")
    assert record.display == f"{plaintext[:11]}…{plaintext[-4:]}"
    assert record.status() == "active"
    assert not record.admin
    assert not record.log_payloads
    fetched = await keys.get(record.id)
    assert fetched == record
    assert fetched.expires_at == expires
    assert "key_hash" not in record.to_dict()
    assert plaintext not in str(record.to_dict())


async def test_authenticate_gives_the_principal_of_a_live_key(keys: KeyService) -> None:
    plaintext, record = await keys.create(
        "app", models=["gpt-*"], rpm=5, metadata={"env": "prod"}, admin=True
    )
    principal = await keys.authenticate(plaintext)
    assert principal is not None
    assert (principal.key_id, principal.name, principal.models) == (record.id, "app", ("gpt-*",))
    assert principal.admin
    assert principal.rpm == 5
    assert principal.metadata == {"env": "prod"}
    assert await keys.authenticate(plaintext + "x") is None
    assert await keys.authenticate(KEY_PREFIX + "A" * 43) is None
    assert await keys.authenticate("not-even-a-virtual-key") is None


async def _scan(engine: AsyncEngine) -> str:
    """Every cell of every table, as text."""
    cells: list[str] = []
    async with engine.connect() as conn:
        for table in Base.metadata.sorted_tables:
            rows = (await conn.execute(text(f"SELECT * FROM {table.name}"))).all()
            cells += [str(value) for row in rows for value in row]
    return "\n".join(cells)


async def test_the_plaintext_key_is_never_stored(keys: KeyService, engine: AsyncEngine) -> None:
    first, record = await keys.create("a", owner="o")
    second, _ = await keys.rotate(record.id)
    dump = await _scan(engine)
    for plaintext in (first, second):
        secret = plaintext.removeprefix(KEY_PREFIX)
        assert secret not in dump
        assert secret[4:-4] not in dump  # not even the part that is never displayed
        assert digest(plaintext) in dump  # what is stored instead


async def test_list_filters_and_hides_revoked_keys(keys: KeyService) -> None:
    _, a = await keys.create("a", owner="alice", team="t1")
    _, b = await keys.create("b", owner="bob", team="t1")
    _, c = await keys.create("c", owner="alice", team="t2")
    await keys.revoke(c.id)
    assert [r.id for r in await keys.list()] == [a.id, b.id]
    assert [r.id for r in await keys.list(include_revoked=True)] == [a.id, b.id, c.id]
    assert [r.id for r in await keys.list(owner="alice", include_revoked=True)] == [a.id, c.id]
    assert [r.id for r in await keys.list(team="t1", limit=1, offset=1)] == [b.id]
    with pytest.raises(InvalidRequestError, match="limit"):
        await keys.list(limit=0)


async def test_update_changes_only_what_is_given(keys: KeyService) -> None:
    _plaintext, record = await keys.create("a", rpm=10, metadata={"k": "v"})
    updated = await keys.update(record.id, rpm=None, tpm=500, models=["gpt-4o"], enabled=False)
    assert (updated.rpm, updated.tpm, updated.models, updated.enabled) == (None, 500, ("gpt-4o",), False)
    assert updated.metadata == {"k": "v"}
    assert updated.name == "a"
    assert updated.updated_at >= record.updated_at
    assert await keys.get(record.id) == updated


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"rpm": -1}, "rpm"),
        ({"tpm": 0}, "tpm"),
        ({"max_parallel": True}, "max_parallel"),
        ({"rpm": "10"}, "rpm"),
        ({"models": ["gpt-[4o"]}, "models"),
        ({"models": ["gpt 4o"]}, "models"),
        ({"models": []}, "models"),
        ({"models": "gpt-4o"}, "models"),
        ({"name": "bad\nname"}, "name"),
        ({"name": "zero\u200bwidth"}, "name"),
        ({"name": ""}, "name"),
        ({"owner": "x" * 201}, "owner"),
        ({"metadata": {"k": 1}}, "metadata"),
        ({"expires_at": "next tuesday"}, "expires_at"),
        ({"enabled": "yes"}, "enabled"),
        ({"key_hash": "0" * 64}, "key_hash"),
        ({"revoked_at": None}, "revoked_at"),
    ],
)
async def test_bad_fields_are_refused_naming_the_field(
    keys: KeyService, fields: dict[str, Any], param: str
) -> None:
    _, record = await keys.create("a")
    with pytest.raises(InvalidRequestError, match=f"^{param}: ") as info:
        await keys.update(record.id, **fields)
    assert info.value.param == param
    assert await keys.get(record.id) == record


async def test_create_validates_too(keys: KeyService) -> None:
    with pytest.raises(InvalidRequestError, match=r"^rpm: "):
        await keys.create("a", rpm=-5)
    with pytest.raises(InvalidRequestError, match=r"^expires_at: is in the past"):
        await keys.create("a", expires_at=datetime.now(UTC) - timedelta(seconds=1))
    with pytest.raises(InvalidRequestError, match=r"^name: "):
        await keys.create("tab\there")
    with pytest.raises(InvalidRequestError, match="nothing to update"):
        await keys.update("key_missing")
    assert await keys.list(include_revoked=True) == []


async def test_unknown_ids_are_not_found(keys: KeyService) -> None:
    for key_id in ("key_0000000000000000", INJECTION, "x" * 500):
        with pytest.raises(NotFoundError):
            await keys.get(key_id)
        with pytest.raises(NotFoundError):
            await keys.revoke(key_id)
        with pytest.raises(NotFoundError):
            await keys.rotate(key_id)


async def test_rotate_revokes_the_old_key_and_keeps_the_settings(keys: KeyService) -> None:
    old_plain, old = await keys.create("a", owner="o", team="t", models=["m*"], rpm=7, admin=True)
    new_plain, new = await keys.rotate(old.id)
    assert new_plain != old_plain
    assert new.id != old.id
    assert new.rotated_from == old.id
    assert (new.owner, new.team, new.models, new.rpm, new.admin) == ("o", "t", ("m*",), 7, True)
    assert (await keys.get(old.id)).status() == "revoked"
    assert await keys.authenticate(new_plain) is not None
    with pytest.raises(AuthenticationError) as info:
        await keys.authenticate(old_plain)
    assert info.value.code == "key_revoked"
    assert "revoked" in info.value.message
    with pytest.raises(InvalidRequestError, match="already revoked"):
        await keys.rotate(old.id)


async def test_concurrent_rotations_of_one_key_issue_one_replacement(keys: KeyService) -> None:
    _, old = await keys.create("a")
    results = await asyncio.gather(*(keys.rotate(old.id) for _ in range(3)), return_exceptions=True)
    assert sum(not isinstance(r, BaseException) for r in results) == 1
    assert all(isinstance(r, InvalidRequestError) for r in results if isinstance(r, BaseException))
    assert len(await keys.list()) == 1


async def test_revoke_is_final_and_idempotent(keys: KeyService) -> None:
    _plaintext, record = await keys.create("a")
    revoked = await keys.revoke(record.id)
    assert revoked.revoked_at is not None
    assert revoked.status() == "revoked"
    assert (await keys.revoke(record.id)).revoked_at == revoked.revoked_at
    with pytest.raises(InvalidRequestError, match="revoked and cannot change"):
        await keys.update(record.id, enabled=True)


async def test_refusals_say_why(keys: KeyService) -> None:
    plaintext, record = await keys.create("a", expires_at=datetime.now(UTC) + timedelta(hours=1))
    await keys.update(record.id, enabled=False)
    with pytest.raises(AuthenticationError) as info:
        await keys.authenticate(plaintext)
    assert info.value.code == "key_disabled"
    assert info.value.status == 401
    await keys.update(record.id, enabled=True, expires_at=datetime.now(UTC) - timedelta(seconds=1))
    with pytest.raises(AuthenticationError) as info:
        await keys.authenticate(plaintext)
    assert info.value.code == "key_expired"
    assert "expired" in info.value.message
    await keys.update(record.id, expires_at=None)
    assert await keys.authenticate(plaintext) is not None


async def test_sql_shaped_text_is_stored_verbatim_and_harmless(keys: KeyService, engine: AsyncEngine) -> None:
    plaintext, record = await keys.create(INJECTION, owner="' OR '1'='1", team='"; DELETE FROM audit_log; --')
    await keys.create("other", owner="bob")
    fetched = await keys.get(record.id)
    assert (fetched.name, fetched.owner, fetched.team) == (
        INJECTION,
        "' OR '1'='1",
        '"; DELETE FROM audit_log; --',
    )
    assert [r.id for r in await keys.list(owner="' OR '1'='1")] == [record.id]
    assert await keys.list(owner="x' OR 'a'='a") == []
    assert len(await keys.list()) == 2
    assert (await keys.authenticate(plaintext)) is not None
    await keys.update(record.id, metadata={"note": "'; DROP TABLE api_keys; --"})
    assert (await keys.get(record.id)).metadata == {"note": "'; DROP TABLE api_keys; --"}
