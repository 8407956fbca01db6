"""`swarmnet send` then `swarmnet inbox` from other shells against a detached network;
the plaintext reaches no node's database, log or capture; `swarmnet workload` then
`swarmnet check` judge the live network."""

import subprocess
import sys

import pytest

from chaos.checkers.unlinkability import scan_for_plaintext
from testnet import rundir

pytestmark = pytest.mark.network


def swarmnet(*args, timeout=60):
    return subprocess.run([sys.executable, "-m", "testnet.cli", *args], capture_output=True, text=True,
                          timeout=timeout)


def test_send_then_inbox_shows_text_and_sender(tmp_path):
    run = tmp_path / "run"
    up = swarmnet("up", "--nodes", "7", "--users", "3", "--min-swarm", "3", "--links", "direct",
                  "--run-dir", str(run), "--detach")
    assert up.returncode == 0, up.stderr
    try:
        text = "canary-4f1c hello bob"
        sent = swarmnet("send", "--from", "alice", "--to", "bob", text, "--run-dir", str(run))
        assert sent.returncode == 0, sent.stderr
        inbox = swarmnet("inbox", "bob", "--run-dir", str(run))
        assert inbox.returncode == 0, inbox.stderr
        alice = next(u for u in rundir.load_run(run)["users"] if u["name"] == "alice")["session_id"]
        line = next(l for l in inbox.stdout.splitlines() if text in l)
        assert alice in line
        assert scan_for_plaintext(run, {"text": text.encode()}) == []
        bad = swarmnet("send", "--from", "mallory", "--to", "bob", "x", "--run-dir", str(run))
        assert bad.returncode != 0 and "no user 'mallory'" in bad.stderr
        # A workload from another shell, then `swarmnet check` against the live network.
        work = swarmnet("workload", "--messages", "20", "--rate", "40", "--run-dir", str(run))
        assert work.returncode == 0, work.stderr
        check = swarmnet("check", str(run))
        assert check.returncode == 0, check.stdout + check.stderr
        assert "verdict: valid" in check.stdout and "swarms from registry" in check.stdout
    finally:
        down = swarmnet("down", "--run-dir", str(run))
        assert down.returncode == 0, down.stderr
