"""The control-plane server's garbage-collector tuning, each case in a fresh interpreter (it changes the
process's collector)."""

from __future__ import annotations

import subprocess
import sys
import textwrap


def _run(code: str) -> None:
    prelude = textwrap.dedent(
        """
        import gc, weakref
        from cloudmodal.server.gc_tuning import THRESHOLD0, ServerGC

        class Node:
            pass

        def cycle():
            a, b = Node(), Node()
            a.other, b.other = b, a
            return weakref.ref(a)
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", prelude + textwrap.dedent(code)], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr


def test_install_freezes_startup_and_raises_the_young_threshold_and_uninstall_restores() -> None:
    _run(
        """
        before = gc.get_threshold()
        t = ServerGC()
        t.install()
        assert gc.get_freeze_count() > 1000, gc.get_freeze_count()
        assert gc.get_threshold() == (THRESHOLD0, before[1], before[2])
        t.uninstall()
        assert gc.get_threshold() == before
        assert gc.get_freeze_count() == 0
        assert t._after_collection not in gc.callbacks
        """
    )


def test_survivors_of_a_full_collection_are_frozen_and_garbage_among_them_waits_for_the_thaw() -> None:
    _run(
        """
        now = [0.0]
        t = ServerGC(thaw_s=100.0, clock=lambda: now[0])
        t.install()
        kept = [Node() for _ in range(1000)]
        frozen = gc.get_freeze_count()
        gc.collect()
        assert gc.get_freeze_count() >= frozen + 1000  # the survivors: never scanned again
        # a cycle that was alive at a freeze and died after it is not collected while frozen ...
        holder = [Node()]
        holder[0].me = holder[0]
        ref = weakref.ref(holder[0])
        gc.collect()
        del holder
        gc.collect()
        assert ref() is not None
        # ... until a full collection after the thaw period: the frozen objects go back, the next collects
        now[0] = 100.0
        gc.collect()
        assert gc.get_freeze_count() == 0
        gc.collect()
        assert ref() is None
        assert gc.get_freeze_count() > 0  # and frozen again
        """
    )


def test_young_and_middle_collections_freeze_nothing() -> None:
    _run(
        """
        t = ServerGC(thaw_s=1e9)
        t.install()
        frozen = gc.get_freeze_count()
        ref = cycle()
        gc.collect(0)
        gc.collect(1)
        assert gc.get_freeze_count() == frozen
        assert ref() is None
        """
    )
