"""Folders written whole: what a save leaves behind has the modes the umask gives (libraries that write through
temporary files leave them owner-only, so an exported model could not be read by another user or a container)."""

import os
import stat
import tempfile
from pathlib import Path

import pytest

from pipelines.files import atomic_save, atomic_save_dir


def _write_like_the_libraries(folder):
    fd, tmp = tempfile.mkstemp(dir=folder)  # 0600, as safetensors' and diffusers' writers leave their files
    os.write(fd, b"weights")
    os.close(fd)
    os.replace(tmp, Path(folder) / "model.safetensors")
    sub = Path(tempfile.mkdtemp(dir=folder))  # 0700
    (sub / "config.json").write_text("{}")


@pytest.mark.parametrize("umask, file_mode, dir_mode", [(0o022, 0o644, 0o755), (0o077, 0o600, 0o700)])
def test_saved_folders_and_files_get_the_umask_modes(tmp_path, umask, file_mode, dir_mode):
    old = os.umask(umask)
    try:
        atomic_save_dir(_write_like_the_libraries, tmp_path / "pipeline")
        atomic_save(lambda p: Path(p).write_text("x"), tmp_path / "single.safetensors")
    finally:
        os.umask(old)
    modes = {p.relative_to(tmp_path).as_posix(): stat.S_IMODE(p.stat().st_mode) for p in tmp_path.rglob("*")}
    for name, mode in modes.items():
        assert mode == (dir_mode if (tmp_path / name).is_dir() else file_mode), (name, oct(mode))
    assert len(modes) == 5  # the folder, its file, the sub-folder and its file; the single file
