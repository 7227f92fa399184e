"""BuildLock: one holder at a time, and its file gone after use without breaking that."""

import threading
import time

import pytest

from grains_edge import locking
from grains_edge.locking import BuildLock

pytestmark = pytest.mark.skipif(locking.fcntl is None, reason="flock: POSIX only")


def test_the_lock_file_is_removed_after_use_and_the_lock_works_again(tmp_path):
    path = tmp_path / "x.lock"
    first = BuildLock(path)
    assert first.acquire(blocking=False) and path.exists()
    assert not BuildLock(path).acquire(blocking=False)
    first.release()
    assert not path.exists()
    again = BuildLock(path)
    assert again.acquire(blocking=False)
    again.release()


def test_removing_the_file_never_lets_two_holders_in(tmp_path):
    """A waiter blocked on the file the holder then removes must not hold the lock beside a newcomer that
    created a new file at the path (with a plain unlink-on-release both would hold it)."""
    path = tmp_path / "x.lock"
    holder, waiter, newcomer = BuildLock(path), BuildLock(path), BuildLock(path)
    assert holder.acquire(blocking=False)
    waiting = threading.Thread(target=waiter.acquire)
    waiting.start()
    time.sleep(0.3)  # the waiter has opened the old file and blocks on it
    holder.release()
    newcomer_holds = newcomer.acquire(blocking=False)
    waiting.join(timeout=0.5)
    waiter_holds = not waiting.is_alive()
    assert newcomer_holds != waiter_holds  # exactly one of them holds it
    if newcomer_holds:
        newcomer.release()
        waiting.join(timeout=5)
        assert not waiting.is_alive()  # the waiter gets it next
    waiter.release()
    assert not path.exists()
