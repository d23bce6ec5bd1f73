"""The native build's lock: a lock file left by a build killed midway must not make every
later process wait forever (torch's FileBaton waits while the file exists)."""
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
