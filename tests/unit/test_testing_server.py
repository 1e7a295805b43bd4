"""``exit_on_sigterm``: a killed bench script still runs its ``finally`` (and so stops its server)."""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap


def test_sigterm_runs_finally(tmp_path):
    marker = tmp_path / "stopped"
    script = textwrap.dedent(f"""
        import sys, time
        from vllm_negablate.testing.server import exit_on_sigterm
        exit_on_sigterm()
        try:
            print("ready", flush=True)
            time.sleep(60)
        finally:
            open({str(marker)!r}, "w").write("stopped")
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "ready"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 128 + signal.SIGTERM
    finally:
        proc.kill()
    assert marker.read_text() == "stopped"
