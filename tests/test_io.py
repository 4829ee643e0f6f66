"""The one atomic writer: a file or folder appears whole at its path or not at all, and nothing temporary is left."""

import pytest

from iam.io import atomic_file, atomic_folder, write_atomic


def test_write_atomic_replaces_a_file_and_leaves_nothing_beside_it(tmp_path):
    path = tmp_path / "report.json"
    path.write_text("old")
    write_atomic(path, "new")
    write_atomic(tmp_path / "blob.bin", b"\x00\x01")
    assert path.read_text() == "new" and (tmp_path / "blob.bin").read_bytes() == b"\x00\x01"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["blob.bin", "report.json"]


def test_an_error_while_writing_keeps_the_old_file_and_removes_the_part(tmp_path):
    path = tmp_path / "report.json"
    path.write_text("old")
    with pytest.raises(RuntimeError), atomic_file(path) as tmp:
        tmp.write_text("half")
        raise RuntimeError("interrupted")
    assert path.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["report.json"]


def test_atomic_folder_replaces_a_folder_whole(tmp_path):
    final = tmp_path / "step-000002"
    final.mkdir()
    (final / "stale").write_text("x")
    with atomic_folder(final) as tmp:
        assert tmp.parent == tmp_path and tmp.name.startswith(".step-000002.") and tmp.name.endswith(".partial")
        (tmp / "state.json").write_text("{}")
    assert [p.name for p in final.iterdir()] == ["state.json"]
    assert [p.name for p in tmp_path.iterdir()] == ["step-000002"]


def test_atomic_folder_replaces_a_dangling_symlink(tmp_path):
    final = tmp_path / "model"
    final.symlink_to(tmp_path / "gone")
    with atomic_folder(final) as tmp:
        (tmp / "config.json").write_text("{}")
    assert not final.is_symlink() and (final / "config.json").exists()


def test_an_error_while_filling_a_folder_keeps_the_old_one(tmp_path):
    final = tmp_path / "slm"
    final.mkdir()
    (final / "model.safetensors").write_text("old")
    with pytest.raises(RuntimeError), atomic_folder(final, tmp_path / "scratch") as tmp:
        (tmp / "model.safetensors").write_text("half")
        raise RuntimeError("interrupted")
    assert (final / "model.safetensors").read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["slm"]


def test_a_failed_rename_puts_the_old_folder_back(tmp_path, monkeypatch):
    """The old folder is moved aside just before the new one is renamed in; if that rename fails (a full disk, a
    permission), the old folder must come back rather than be removed with the temporary one."""
    import os

    final = tmp_path / "slm"
    final.mkdir()
    (final / "weights").write_text("old")
    real_rename = os.rename

    def rename(src, dst):
        if str(src).endswith(".partial") and str(dst) == str(final):
            raise OSError("no space left on device")
        return real_rename(src, dst)

    monkeypatch.setattr(os, "rename", rename)
    with pytest.raises(OSError, match="no space"), atomic_folder(final) as tmp:
        (tmp / "weights").write_text("new")
    assert (final / "weights").read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["slm"]
