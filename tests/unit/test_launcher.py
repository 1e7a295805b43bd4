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
        from server.launcher import exit_on_sigterm
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


def test_server_command_and_admin_key(tmp_path, monkeypatch):
    from server.launcher import ServerProcess, worker_slots

    monkeypatch.delenv("NEGABLATE_MAX_SETS", raising=False)
    monkeypatch.delenv("NEGABLATE_WORKER_SLOTS", raising=False)
    srv = ServerProcess(tmp_path / "m", "--max-sets", "3", log_path=tmp_path / "log", served_name="x",
                        kv_cache_bytes=2**20, max_model_len=64, env={"A": "1"})
    cmd = srv.cmd[srv.cmd.index("server.app") + 1:]
    assert cmd[:10] == [str(tmp_path / "m"), "--host", "127.0.0.1", "--port", str(srv.port),
                        "--served-model-name", "x", "--dtype", "float32", "--enforce-eager"]
    assert cmd[cmd.index("--kv-cache-memory-bytes") + 1] == str(2**20)
    assert cmd[cmd.index("--max-model-len") + 1] == "64"
    assert cmd[cmd.index("--admin-key") + 1] == srv.admin_key and len(srv.admin_key) == 16
    assert srv.env["A"] == "1" and srv.url == f"http://127.0.0.1:{srv.port}"
    # server defaults: no KV size or length forced; a given admin key is used as is
    plain = ServerProcess(tmp_path / "m", log_path=tmp_path / "log", admin_key="k")
    assert "--kv-cache-memory-bytes" not in plain.cmd and "--max-model-len" not in plain.cmd
    assert plain.cmd.count("--admin-key") == 1 and plain.cmd[plain.cmd.index("--admin-key") + 1] == "k"
    assert worker_slots(2) == 6 and worker_slots(8) == 18


def test_worker_slots_respect_a_larger_request_and_the_old_name():
    from server.launcher import ensure_worker_slots

    env = {}
    ensure_worker_slots(env, 2)
    assert env == {"NEGABLATE_WORKER_SLOTS": "6"}
    env = {"NEGABLATE_MAX_SETS": "32"}  # the old name, as older scripts set it
    ensure_worker_slots(env, 2)
    assert env == {"NEGABLATE_WORKER_SLOTS": "32"}
    env = {"NEGABLATE_WORKER_SLOTS": "4"}
    ensure_worker_slots(env, 8)
    assert env == {"NEGABLATE_WORKER_SLOTS": "18"}
