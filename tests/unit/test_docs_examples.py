"""Every ```yaml block of docs/configuration.md is a valid configuration.

References are satisfied with dummy values: each ``${env:NAME}`` sets ``NAME`` and each
``${secret:NAME}`` sets the variable the env secrets backend reads (upper-cased, ``-``/``.``
→ ``_``). ``${file:...}`` references belong in prose, not in these examples.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from tokyo_ia.config import parse_config
from tokyo_ia.security.secrets import env_name

DOC = Path(__file__).resolve().parents[2] / "docs" / "configuration.md"
_BLOCK = re.compile(r"^```yaml[ \t]*\n(.*?)^```[ \t]*$", re.S | re.M)
_REF = re.compile(r"\$\{(env|file|secret):([^}]*)\}")


def _blocks() -> list[tuple[int, str]]:
    text = DOC.read_text(encoding="utf-8")
    return [(text.count("\n", 0, m.start()) + 1, m.group(1)) for m in _BLOCK.finditer(text)]


BLOCKS = _blocks()


def test_the_doc_has_examples() -> None:
    assert len(BLOCKS) >= 3


@pytest.mark.parametrize(("line", "block"), BLOCKS, ids=[f"line-{line}" for line, _ in BLOCKS])
def test_yaml_example_is_a_valid_config(line: int, block: str, monkeypatch: pytest.MonkeyPatch) -> None:
    for kind, ref in _REF.findall(block):
        if kind == "env":
            name = ref.partition(":-")[0]
            monkeypatch.setenv(name, f"dummy-{name.lower()}")
        elif kind == "secret":
            monkeypatch.setenv(env_name(ref), f"dummy-{ref}")
        else:
            pytest.fail(f"docs/configuration.md:{line}: ${{file:{ref}}} cannot be checked; show it in prose")
    data = yaml.safe_load(block)
    assert isinstance(data, dict), f"docs/configuration.md:{line}: the example is not a mapping"
    parse_config(data, source=f"docs/configuration.md:{line}")
