"""``tokyo-ia db`` and ``tokyo-ia keys`` in-process, on a config that points at a real database."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import orjson
import pytest
import yaml

from tokyo_ia.errors import ConfigError
from tokyo_ia.store.cli import add_commands


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tokyo-ia")
    add_commands(parser.add_subparsers(dest="command", required=True))
    return parser


class Cli:
    def __init__(self, config: Path, capsys: pytest.CaptureFixture[str]) -> None:
        self.config = config
        self.capsys = capsys

    def __call__(self, *argv: str) -> tuple[int, str, str]:
        args = _parser().parse_args([*argv, "--config", str(self.config)])
        code = int(args.func(args))
        out, err = self.capsys.readouterr()
        return code, out, err

    def json(self, *argv: str) -> Any:
        code, out, err = self(*argv, "--json")
        assert code == 0, err
        return orjson.loads(out)


@pytest.fixture
def cli(empty_db_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> Cli:
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({"store": {"url": empty_db_url}}))
    return Cli(config, capsys)


def test_keys_commands_need_a_migrated_database(cli: Cli) -> None:
    with pytest.raises(ConfigError, match="run: tokyo-ia db upgrade"):
        cli("keys", "list")
    assert cli("db", "current")[0] == 1
    code, out, _ = cli("db", "upgrade")
    assert code == 0
    assert "is at revision 0002" in out
    code, out, _ = cli("db", "current")
    assert code == 0
    assert "up to date" in out


def test_key_life_cycle_from_the_shell(cli: Cli) -> None:
    cli("db", "upgrade")
    created = cli.json(
        "keys", "create", "--name", "ci-bot", "--owner", "ops", "--model", "gpt-*", "--model", "claude-*",
        "--rpm", "60", "--meta", "ticket=OPS-7", "--expires-at", "2099-01-01T00:00:00Z",
    )  # fmt: skip
    plaintext, key_id = created["key"], created["id"]
    assert plaintext.startswith("sk-tia-")
    assert created["models"] == ["gpt-*", "claude-*"]
    assert created["metadata"] == {"ticket": "OPS-7"}
    assert created["rpm"] == 60

    code, table, _ = cli("keys", "list")
    assert code == 0
    assert "ci-bot" in table
    assert key_id in table
    assert created["display"] in table
    assert plaintext not in table
    assert [k["id"] for k in cli.json("keys", "list", "--owner", "ops")] == [key_id]
    assert cli.json("keys", "get", key_id)["name"] == "ci-bot"

    code, out, _ = cli("keys", "rotate", key_id)
    assert code == 0
    assert "shown only once" in out
    new_plain = next(line.split()[1] for line in out.splitlines() if line.startswith("key: "))
    assert new_plain.startswith("sk-tia-")
    assert new_plain != plaintext

    assert cli.json("keys", "get", key_id)["status"] == "revoked"
    assert cli.json("keys", "list") != []
    assert len(cli.json("keys", "list", "--all")) == 2
    rotated = cli.json("keys", "list")[0]
    assert cli.json("keys", "revoke", rotated["id"])["status"] == "revoked"
    assert cli("keys", "list")[1].strip() == "no keys"


def test_bad_input_is_one_line_on_stderr(cli: Cli) -> None:
    cli("db", "upgrade")
    code, _, err = cli("keys", "create", "--name", "a", "--rpm", "-5")
    assert code == 1
    assert err.startswith("tokyo-ia: error: rpm: ")
    code, _, err = cli("keys", "create", "--name", "a", "--model", "gpt 4")
    assert code == 1
    assert "models: " in err
    code, _, err = cli("keys", "get", "key_missing")
    assert code == 1
    assert "no API key with id 'key_missing'" in err
    code, _, err = cli("keys", "create", "--name", "a", "--meta", "novalue")
    assert code == 1
    assert "KEY=VALUE" in err


def test_an_unreachable_database_is_a_config_error_without_the_password(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "config.yaml"
    url = "postgresql+asyncpg://u:hunter2@127.0.0.1:1/db"
    config.write_text(yaml.safe_dump({"store": {"url": url}}))
    with pytest.raises(ConfigError, match="cannot use the database") as info:
        Cli(config, capsys)("db", "upgrade")
    assert "hunter2" not in str(info.value)
