"""`diffusion_jax.runtime.files`: the one atomic write (checkpoint records, evaluation results, the
Inception weights' download, the digits classifier's cache)."""

from __future__ import annotations

import pytest

from diffusion_jax.runtime import errors, files


def test_write_atomic_replaces_the_file_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "a.json"
    path.write_bytes(b"old")
    files.write_atomic(path, b"new")
    assert path.read_bytes() == b"new"
    assert [p.name for p in tmp_path.iterdir()] == ["a.json"]


def test_a_failed_write_keeps_the_old_file_and_removes_the_temporary(tmp_path):
    path = tmp_path / "a.json"
    path.write_bytes(b"old")
    with pytest.raises(RuntimeError), files.atomic_path(path) as tmp:
        assert tmp.parent == tmp_path and tmp.name != path.name
        tmp.write_bytes(b"half")
        raise RuntimeError("interrupted")
    assert path.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["a.json"]


def test_check_choice_names_the_field_the_value_and_the_allowed():
    errors.check_choice("mode", "eval", ("train", "eval"))
    with pytest.raises(errors.ConfigError, match=r"^mode='x' is not supported; allowed: a, b$"):
        errors.check_choice("mode", "x", ("a", "b"))
