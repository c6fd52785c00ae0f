"""Rust-published Celery messages against Python Celery itself: a real worker runs them,
and their envelope matches, field by field, one that Python Celery's send_task writes."""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path
from urllib.parse import urlparse

import pytest
import redis

HERE = Path(__file__).parent


@pytest.fixture
def redis_url() -> str:
    url = os.environ.get("CCAT_TEST_REDIS_URL")
    assert url, "CCAT_TEST_REDIS_URL is not set: run the tests with `nox -s tests`"
    return url


def ccat_wfm_send(redis_url: str, prefix: str, *args: str) -> str:
    """Publishes with the installed `ccat-wfm send` (the Rust producer); returns the id."""
    url = urlparse(redis_url)
    env = {
        **os.environ,
        "CCAT_WORKFLOW_MANAGER_REDIS_HOST": url.hostname or "localhost",
        "CCAT_WORKFLOW_MANAGER_REDIS_PORT": str(url.port or 6379),
    }
    exe = shutil.which("ccat-wfm", path=str(Path(sys.executable).parent))
    assert exe, "ccat-wfm is not installed next to this interpreter"
    out = subprocess.run(
        [exe, "send", *args, "--key-prefix", prefix],
        env=env, check=True, capture_output=True, text=True, timeout=60,
    )
    return out.stdout.strip()


def test_a_python_worker_runs_tasks_published_from_rust(redis_url: str) -> None:
    prefix = f"test-worker-{uuid.uuid4()}:"
    env = {
        **os.environ,
        "CCAT_TEST_REDIS_URL": redis_url,
        "CCAT_PROBE_PREFIX": prefix,
        "PYTHONPATH": str(HERE),
    }
    worker = subprocess.Popen(
        [sys.executable, "-m", "celery", "-A", "celery_probe", "worker", "--pool", "solo",
         "-Q", "workflow.hpc,workflow.staging", "--without-heartbeat", "--without-gossip",
         "--without-mingle", "--loglevel", "INFO"],
        cwd=HERE, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    try:
        sent = {}
        for queue, priority, arg in [("workflow.hpc", "0", "p0"), ("workflow.hpc", "6", "p6"),
                                     ("workflow.hpc", "9", "p9"), ("workflow.staging", "0", "s")]:
            task_id = ccat_wfm_send(
                redis_url, prefix, "ccat.probe.record", "--queue", queue, "--priority", priority,
                "--args", json.dumps([arg, 42, None]), "--kwargs", json.dumps({"flag": True}),
            )
            sent[task_id] = (queue, arg)
        r = redis.Redis.from_url(redis_url)
        deadline = time.monotonic() + 60
        received = {}
        while time.monotonic() < deadline and len(received) < len(sent):
            for task_id in sent:
                raw = r.get(f"{prefix}probe:{task_id}")
                if raw is not None:
                    received[task_id] = json.loads(raw)
            time.sleep(0.2)
        assert len(received) == len(sent), f"worker ran {len(received)} of {len(sent)}"
        for task_id, (queue, arg) in sent.items():
            got = received[task_id]
            assert got["args"] == [arg, 42, None]
            assert got["kwargs"] == {"flag": True}
            assert got["routing_key"] == queue
    finally:
        worker.terminate()
        try:
            out, _ = worker.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            worker.kill()
            out, _ = worker.communicate()
        print(out[-4000:])


# Fields that differ between any two messages; and reply_to, where Python Celery names
# its app instance (for RPC results, which the managers do not use) and we send "".
VOLATILE = {"id", "root_id", "correlation_id", "delivery_tag", "origin", "body", "reply_to"}


def comparable(message: dict) -> dict:
    out = {}
    for part in ("headers", "properties"):
        out[part] = {k: ("<volatile>" if k in VOLATILE else v) for k, v in message[part].items()}
    out["top"] = {k: v for k, v in message.items() if k not in ("headers", "properties", "body")}
    out["body"] = json.loads(base64.b64decode(message["body"]))
    return out


def test_the_rust_envelope_matches_python_celerys_field_by_field(redis_url: str) -> None:
    from ccat_workflow_manager.celery_app import make_app

    prefix = f"test-envelope-{uuid.uuid4()}:"
    app = make_app(redis_url, global_keyprefix=prefix)
    args, kwargs = [1, "it's", None], {"force": True}
    app.send_task("ccat.probe.record", args=args, kwargs=kwargs, queue="workflow.results")
    ccat_wfm_send(redis_url, prefix, "ccat.probe.record", "--queue", "workflow.results",
                  "--args", json.dumps(args), "--kwargs", json.dumps(kwargs))
    r = redis.Redis.from_url(redis_url)
    key = f"{prefix}workflow.results"
    raw = r.lrange(key, 0, -1)
    r.delete(key)
    assert len(raw) == 2
    rust, python = (json.loads(m) for m in raw)  # LPUSH: the newest comes first
    assert comparable(rust) == comparable(python)


def test_a_password_with_url_characters_reaches_the_broker_intact():
    from kombu.utils.url import url_to_parts

    from ccat_workflow_manager.celery_app import broker_url

    password = "p@ss:w/rd%20#?"
    url = broker_url({"REDIS_HOST": "redis.example", "REDIS_PORT": 6380, "REDIS_PASSWORD": password})
    parts = url_to_parts(url)
    assert (parts.hostname, parts.port, parts.password) == ("redis.example", 6380, password)
