"""`jobs/rlap.py` through the Ray Jobs API on a real head (one per module) on this machine.

The head is `ray start --head --block` from this virtualenv (so the job's `python` is this
virtualenv's), with token authentication on, its own token file (RAY_AUTH_TOKEN_PATH, the documented
way to keep several tokens apart), its own temp dir and free ports: other Ray clusters may be
running on the machine at the same time. `ray stop` would stop every Ray on the machine, so the
head is stopped by killing the process group it was started in.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

pytest.importorskip("ray")

pytestmark = [pytest.mark.ray, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent  # the virtualenv running the tests: its `ray` and `python`
QUICK = ["data.max_train_samples=400", "initial.epochs=5", "f_ft.epochs=2", "run.routes=[f_ft]"]
TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}


@dataclass(frozen=True)
class Head:
    address: str  # the dashboard / Jobs API: http://127.0.0.1:PORT
    token: str
    env: dict[str, str]  # for clients (and the head itself): RAY_AUTH_MODE=token, RAY_AUTH_TOKEN_PATH


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:  # all bound at once, so the ports differ
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _http_status(url: str, token: str | None) -> int:
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status
    except urllib.error.HTTPError as e:
        return e.code
    except OSError:  # not listening (yet)
        return 0


def _runtime_env() -> dict:
    """cluster/runtime_env.yaml without `pip`: the head runs in this virtualenv, which has every
    dependency, and no package index is reachable from the test machine."""
    env = yaml.safe_load((REPO / "cluster" / "runtime_env.yaml").read_text())
    return {"excludes": env["excludes"], "env_vars": env["env_vars"]}


def _own_leftovers(root: Path) -> list[int]:
    """Processes still running whose command line names this module's temp dir."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if str(root).encode() in (entry / "cmdline").read_bytes():
                    pids.append(int(entry.name))
            except OSError:
                pass
    return pids


def _warm_up(address: str, token: str, deadline: float) -> None:
    """Run a no-op job. The Jobs API answers GETs before the head can take a job: until its job
    agent is up a submission fails with 'No available agent to submit job, please try again later',
    on a busy machine the dashboard may drop the first POSTs (connection closed), and its version
    endpoint may answer 200 with a body that is not JSON yet (the client's version check fails)."""
    import requests
    from ray.job_submission import JobSubmissionClient

    while True:
        try:
            client = JobSubmissionClient(address, headers={"Authorization": f"Bearer {token}"})
            job_id = client.submit_job(entrypoint="python -c 'print(1)'")
            break
        except (RuntimeError, requests.exceptions.ConnectionError, requests.exceptions.JSONDecodeError) as e:
            early = (requests.exceptions.ConnectionError, requests.exceptions.JSONDecodeError)
            not_yet = isinstance(e, early) or "No available agent" in str(e)
            if not not_yet or time.monotonic() > deadline:
                raise
            time.sleep(2)
    assert _wait_terminal(client, job_id, max(deadline - time.monotonic(), 60)) == "SUCCEEDED"


@pytest.fixture(scope="module")
def head():
    # A short root: Ray's Unix socket paths under the temp dir must stay below 108 characters.
    root = Path(tempfile.mkdtemp(prefix="rpjobs-", dir="/tmp"))
    token = secrets.token_hex(32)
    token_file = root / "auth_token"
    token_file.write_text(token)
    token_file.chmod(0o600)
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS", "RAY_AUTH_TOKEN")}
    env.update(
        RAY_AUTH_MODE="token",
        RAY_AUTH_TOKEN_PATH=str(token_file),
        PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}",
        RAY_USAGE_STATS_ENABLED="0",
    )
    gcs, dashboard, ray_client, node_manager, object_manager, agent, agent_grpc, runtime_env, metrics = _free_ports(9)
    # No --node-ip-address=127.0.0.1: Ray replaces a loopback address by the machine's routable one anyway.
    cmd = [
        str(BIN / "ray"), "start", "--head", "--block", "--num-cpus=2", "--include-dashboard=true",
        "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}", f"--port={gcs}",
        f"--ray-client-server-port={ray_client}", f"--node-manager-port={node_manager}",
        f"--object-manager-port={object_manager}", f"--dashboard-agent-listen-port={agent}",
        f"--dashboard-agent-grpc-port={agent_grpc}", f"--runtime-env-agent-port={runtime_env}",
        f"--metrics-export-port={metrics}", "--min-worker-port=0", "--max-worker-port=0",  # 0: any free port
        f"--temp-dir={root / 'ray'}",
    ]  # fmt: skip
    address = f"http://127.0.0.1:{dashboard}"
    with open(root / "head.log", "wb") as log:
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 180
        while _http_status(f"{address}/api/jobs/", token) != 200:
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail("the Ray head did not come up:\n" + (root / "head.log").read_text()[-3000:])
            time.sleep(1)
        _warm_up(address, token, deadline)
        yield Head(address, token, env)
    finally:
        # What `ray stop --force` does, but only to this head: SIGKILL to its process group.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
        for pid in _own_leftovers(root):  # anything that left the group (none seen so far)
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def client(head):
    from ray.job_submission import JobSubmissionClient

    # Token auth over HTTP: the token as a bearer Authorization header (what the CLI sends when
    # RAY_AUTH_MODE=token finds a token), explicit here so this process's own Ray state is irrelevant.
    return JobSubmissionClient(head.address, headers={"Authorization": f"Bearer {head.token}"})


def _entrypoint(out: Path, overrides: list[str]) -> list[str]:
    return ["python", "jobs/rlap.py", "--out", str(out), "--config", "jobs/configs/digits.yaml", *overrides]


def _submit(client, out: Path, overrides: list[str]) -> str:
    runtime_env = {"working_dir": str(REPO), **_runtime_env()}
    return client.submit_job(entrypoint=shlex.join(_entrypoint(out, overrides)), runtime_env=runtime_env)


def _wait(predicate, timeout: float, what: str, every: float = 1.0):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(every)


def _wait_terminal(client, job_id: str, timeout: float) -> str:
    return str(_wait(lambda: (s := str(client.get_job_status(job_id))) in TERMINAL and s, timeout, f"job {job_id}"))


def test_head_refuses_clients_without_the_token(head):
    assert _http_status(f"{head.address}/api/jobs/", None) == 401
    assert _http_status(f"{head.address}/api/jobs/", "not-the-token") == 403


def test_cli_submit_runs_the_job_to_success(head, tmp_path):
    out = tmp_path / "run"
    job_id = f"raypipe-test-{secrets.token_hex(4)}"
    submit = [
        str(BIN / "ray"), "job", "submit", "--address", head.address, "--submission-id", job_id,
        "--working-dir", str(REPO), "--runtime-env-json", json.dumps(_runtime_env()),
        "--", *_entrypoint(out, QUICK),
    ]  # fmt: skip
    result = subprocess.run(submit, env=head.env, capture_output=True, text=True, timeout=1200, cwd=REPO)
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    assert "(every setting: " in result.stdout  # `ray job submit` follows the job's logs: the summary first

    status = subprocess.run(
        [str(BIN / "ray"), "job", "status", "--address", head.address, job_id],
        env=head.env, capture_output=True, text=True, timeout=120, check=True,
    )  # fmt: skip
    assert f"Job '{job_id}' succeeded" in status.stdout + status.stderr

    report = json.loads((out / "report.json").read_text())
    assert set(report["routes"]) == {"initial", "f_ft"}
    for route in ("initial", "f_ft"):
        assert 0.0 < report["routes"][route]["accuracy"] <= 1.0, route
    assert (out / "report.md").exists()


def test_sdk_logs_then_stop_leaves_nothing_looking_finished(client, tmp_path):
    out = tmp_path / "run"
    # A job far too long to finish: stopped while the initial model trains.
    job_id = _submit(client, out, [*QUICK, "initial.epochs=100000"])
    logs = _wait(
        lambda: (text := client.get_job_logs(job_id)) and "[initial] training:" in text and text,
        600,
        "the initial route to start training",
        every=2.0,
    )
    assert "epochs: initial 100000" in logs  # the summary of the resolved config is printed first
    assert str(client.get_job_status(job_id)) == "RUNNING"

    assert client.stop_job(job_id)
    assert _wait_terminal(client, job_id, 120) == "STOPPED"
    # The stage that was running has its pending marker and no manifest; the one before it finished.
    assert (out / "data" / "_manifest.json").exists()
    assert (out / "initial" / "_pending.json").exists()
    assert not (out / "initial" / "_manifest.json").exists()
    assert not (out / "report.json").exists() and not (out / "report.md").exists()


@pytest.mark.parametrize(
    ("overrides", "named"),
    [
        (["noise.rat=0.3"], "'noise.rat'"),
        (["data.source=fashion-mnist", "data.path=/nonexistent"], "'/nonexistent'"),
        ([], "'runs/relative'"),  # --out relative to the job's temporary copy of the code
    ],
    ids=["bad-key", "missing-data", "relative-out"],
)
def test_bad_submission_fails_with_a_one_line_error(client, tmp_path, overrides, named):
    out = Path("runs/relative") if not overrides else tmp_path / "run"
    job_id = _submit(client, out, [*QUICK, *overrides])
    assert _wait_terminal(client, job_id, 300) == "FAILED"
    assert client.get_job_info(job_id).driver_exit_code == 2  # a user error, not a crash
    logs = client.get_job_logs(job_id)
    errors = [line for line in logs.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and named in errors[0], logs[-3000:]
    assert "Traceback" not in logs
    assert not (out / "report.json").exists() and not (REPO / "runs" / "relative").exists()
