"""Atomic writes and tree fingerprints."""

from __future__ import annotations

import os

import pytest

from kiln import artifacts


def test_atomic_write_leaves_old_file_on_failure(tmp_path):
    out = tmp_path / "out.json"
    artifacts.write_json(out, {"v": 1})
    with pytest.raises(RuntimeError):
        with artifacts.atomic_path(out) as tmp:
            tmp.write_text("half")
            raise RuntimeError("crash mid-write")
    assert artifacts.read_json(out) == {"v": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["out.json"]  # no temp file left behind


def test_atomic_write_has_normal_mode(tmp_path):
    out = tmp_path / "a.bin"
    artifacts.write_bytes(out, b"x")
    assert out.stat().st_mode & 0o044  # readable by group/others like any output, not mkstemp's 0600


def test_tree_fingerprint_tracks_add_remove_and_rewrite(tmp_path):
    (tmp_path / "a").mkdir()
    f = tmp_path / "a" / "1.ppm"
    f.write_bytes(b"abc")
    fp1 = artifacts.tree_fingerprint(tmp_path)
    assert fp1 == artifacts.tree_fingerprint(tmp_path)
    (tmp_path / "a" / "2.ppm").write_bytes(b"d")
    fp2 = artifacts.tree_fingerprint(tmp_path)
    assert fp2 != fp1
    (tmp_path / "a" / "2.ppm").unlink()
    assert artifacts.tree_fingerprint(tmp_path) == fp1
    f.write_bytes(b"abcd")
    assert artifacts.tree_fingerprint(tmp_path) != fp1
    assert artifacts.tree_fingerprint(tmp_path / "missing") == ""


def test_sha256(tmp_path):
    p = tmp_path / "x"
    p.write_bytes(b"hello")
    assert artifacts.sha256_file(p) == "2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824"
    os.truncate(p, 0)
    assert artifacts.sha256_file(p) == "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
