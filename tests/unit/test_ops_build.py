"""The native build: a lock file left by a build killed midway must not make every later
process wait forever (torch's FileBaton waits while the file exists); every source is compiled
and every header is part of the cache key."""
import os
import time

from loong.ops.build import STALE_LOCK_S, clear_stale_lock


def test_stale_lock_is_removed_fresh_one_kept(tmp_path):
    lock = tmp_path / "lock"
    lock.write_text("")
    clear_stale_lock(str(tmp_path))
    assert lock.exists()                       # a build may be running: keep it
    old = time.time() - STALE_LOCK_S - 5
    os.utime(lock, (old, old))
    clear_stale_lock(str(tmp_path))
    assert not lock.exists()
    clear_stale_lock(str(tmp_path))            # nothing to remove: no error


def test_every_csrc_file_is_built_and_keyed():
    """A source left out of SOURCE_FILES is not compiled; a header left out of HEADER_FILES
    would not change the cache key, so editing it would load a stale build."""
    from loong.ops import build
    on_disk = set(os.listdir(build.CSRC_DIR))
    assert {f for f in on_disk if f.endswith(".cpp")} == set(build.SOURCE_FILES)
    assert {f for f in on_disk if f.endswith(".h")} == set(build.HEADER_FILES)


def test_a_header_change_changes_the_build_key(tmp_path, monkeypatch):
    import shutil

    from loong.ops import build
    csrc = tmp_path / "cpu"
    shutil.copytree(build.CSRC_DIR, csrc)
    monkeypatch.setattr(build, "CSRC_DIR", str(csrc))
    key = build.build_dir(build.extension_sources())
    header = csrc / build.HEADER_FILES[0]
    header.write_text(header.read_text() + "\n// changed\n")
    assert build.build_dir(build.extension_sources()) != key
