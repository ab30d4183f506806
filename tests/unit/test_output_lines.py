"""While worker logs stream to the terminal, a log line never lands in the middle of the program's print."""

from __future__ import annotations

import io
import threading

from cloudmodal.client.session import RunningApp, WholeLines


def test_a_log_line_printed_mid_print_stays_on_its_own_line():
    terminal = io.StringIO()
    app = RunningApp(session=None, app_id="ap-test", name="t")
    out = WholeLines(terminal, app._print_lock)
    out.write("predict:")  # print("predict:", [0, 2]) writes its pieces separately...
    out.write(" ")
    app._print_logs([{"id": 1, "stream": "stdout", "text": "loaded weights in worker 7"}], terminal)
    out.write("[0, 2]")  # ... and a worker's log arrived between them
    out.write("\n")
    assert terminal.getvalue().splitlines() == ["loaded weights in worker 7", "predict: [0, 2]"]


def test_partial_lines_are_kept_per_thread_and_flush_writes_them():
    terminal = io.StringIO()
    out = WholeLines(terminal, threading.Lock())
    t = threading.Thread(target=lambda: (out.write("other "), out.write("thread\n")))
    out.write("main ")
    t.start()
    t.join()
    out.write("thread\nprompt> ")
    assert terminal.getvalue() == "other thread\nmain thread\n"
    out.flush()  # a prompt or a progress bar: the partial line goes out when flushed
    assert terminal.getvalue().endswith("prompt> ")
    assert out.encoding == terminal.encoding  # everything else is the real stream's
