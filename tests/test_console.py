"""The console of the real CLI on a terminal and in a pipe: tqdm's progress bar for the per-shard stages is drawn on
a terminal (a pseudo-terminal here, as a user's shell gives) and never written into a pipe or a log file."""

from __future__ import annotations

import fcntl
import os
import pty
import select
import struct
import subprocess
import sys
import termios
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# Detection alone on digits, in five training shards: the attribution and the partition's per-shard steps each
# have several shards, so each gets a bar on a terminal.
FIND_ISSUES = ["data.shard_rows=300", "initial.epochs=2", "run.device=cpu"]
BAR = "%|"  # tqdm's bar: "  attribution:  40%|####      | 2/5 [...]"


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "TERM": "xterm"}


def _on_a_terminal(argv: list[str], timeout_s: float = 300) -> tuple[int, str]:
    """Run `argv` with stdout and stderr on a new pseudo-terminal -> (exit status, everything it wrote)."""
    leader, follower = pty.openpty()
    # A window size, as a terminal emulator sets it (a bare pseudo-terminal reports 0 columns).
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))
    proc = subprocess.Popen(argv, stdin=follower, stdout=follower, stderr=follower, env=_env(), cwd=REPO)
    os.close(follower)
    chunks: list[bytes] = []
    try:
        while True:
            ready, _, _ = select.select([leader], [], [], timeout_s)
            if not ready:
                proc.kill()
                raise AssertionError(f"no output for {timeout_s} s: {b''.join(chunks)[-2000:]!r}")
            try:
                chunk = os.read(leader, 65536)
            except OSError:  # the terminal closed: every process holding it ended
                break
            if not chunk:
                break
            chunks.append(chunk)
    finally:
        os.close(leader)
    return proc.wait(timeout=60), b"".join(chunks).decode(errors="replace")


def test_a_progress_bar_is_drawn_on_a_terminal(tmp_path):
    argv = [sys.executable, "-m", "raypipe.cli", "find-issues", "--out", str(tmp_path / "run"), *FIND_ISSUES]
    code, console = _on_a_terminal(argv)
    assert code == 0, console[-3000:]
    bars = [line for line in console.replace("\r", "\n").splitlines() if BAR in line]
    assert any(line.lstrip().startswith("attribution:") and "/5 " in line for line in bars), console[-3000:]
    assert any(line.lstrip().startswith("signals:") for line in bars), console[-3000:]
    # The bar is drawn in place (carriage returns) and leaves the summary lines intact.
    assert "\r" in console and "  attribution: 5/5 shards" in console


def test_no_progress_bar_in_a_pipe(tmp_path):
    argv = [sys.executable, "-m", "raypipe.cli", "find-issues", "--out", str(tmp_path / "run"), *FIND_ISSUES]
    done = subprocess.run(argv, capture_output=True, text=True, env=_env(), cwd=REPO, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    console = done.stdout + done.stderr
    assert BAR not in console and "\r" not in console and done.stderr == ""
    assert "  attribution: 5/5 shards" in console  # one line per stage instead of a bar
