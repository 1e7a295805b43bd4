"""One place for the NEGABLATE_* variables: parsed right, and every one in the README's table."""

from __future__ import annotations

from pathlib import Path

import pytest

from vllm_negablate.settings import describe, get_settings

README = Path(__file__).resolve().parents[2] / "README.md"


def test_parsing_aliases_and_empty_values(monkeypatch, tmp_path):
    for var, *_ in describe():
        monkeypatch.delenv(var, raising=False)
    monkeypatch.delenv("NEGABLATE_MAX_SETS", raising=False)
    s = get_settings()
    assert (s.disable, s.kernel, s.worker_slots, s.default_set) == (False, None, 8, None)
    assert s.data_dir.name == "data" and s.data_dir.parent.name == "shared"
    monkeypatch.setenv("NEGABLATE_MAX_SETS", "32")  # the old name still works
    assert get_settings().worker_slots == 32
    monkeypatch.setenv("NEGABLATE_WORKER_SLOTS", "5")  # the new one wins
    assert get_settings().worker_slots == 5
    for value, off in (("1", False), ("yes", False), ("0", True), ("", True), ("false", True)):
        monkeypatch.setenv("NEGABLATE_DISABLE", value)
        assert get_settings().disable is (not off), value
    monkeypatch.setenv("NEGABLATE_DATA_DIR", "")  # empty: unset
    assert get_settings().data_dir.name == "data"
    monkeypatch.setenv("NEGABLATE_DATA_DIR", str(tmp_path))
    assert get_settings().data_dir == tmp_path
    monkeypatch.setenv("NEGABLATE_KERNEL", "fast")
    with pytest.raises(ValueError, match="kernel"):
        get_settings()


def test_every_variable_is_in_the_readme_table():
    text = README.read_text()
    for var, _, _ in describe():
        assert f"| `{var}` |" in text, f"{var} is missing from the README's table"
