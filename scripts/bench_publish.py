"""Publishing throughput, Rust producer against Python Celery's send_task, on one Redis.

Usage: python scripts/bench_publish.py REDIS_URL CCAT_WFM_BINARY [TASKS]
Both publish the same kind of task (one argument, priorities 0-9 in turn) to the same
queue under a scratch key prefix, which is deleted afterwards. Prints both figures and
their ratio beside the goal (Rust at least 10x send_task).
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
import uuid

import redis
from celery import Celery


def python_send_task(url: str, tasks: int) -> float:
    prefix = f"ccat-bench-py-{uuid.uuid4()}:"
    app = Celery("bench", broker=url)
    app.conf.update(
        task_serializer="json",
        accept_content=["json"],
        broker_transport_options={
            "global_keyprefix": prefix,
            "priority_steps": [0, 3, 6, 9],
            "sep": "\x06\x16",
        },
    )
    # One warm-up call opens the connection and declares the queue.
    app.send_task("ccat_workflow_manager.tasks.submit_run", args=[-1], queue="workflow.hpc")
    started = time.perf_counter()
    for i in range(tasks):
        app.send_task(
            "ccat_workflow_manager.tasks.submit_run", args=[i], queue="workflow.hpc", priority=i % 10
        )
    seconds = time.perf_counter() - started
    r = redis.Redis.from_url(url)
    # SCAN, not KEYS: the broker may be shared, and KEYS blocks it for the whole keyspace.
    for key in r.scan_iter(match=f"{prefix}*", count=1000):
        r.delete(key)
    return tasks / seconds


def main() -> None:
    url, binary = sys.argv[1], sys.argv[2]
    tasks = int(sys.argv[3]) if len(sys.argv) > 3 else 20000
    py = python_send_task(url, tasks)
    out = subprocess.run(
        [binary, "bench", "publish", "--redis-url", url, "--tasks", str(tasks * 5), "--json"],
        check=True, capture_output=True, text=True,
    )
    rust = json.loads(out.stdout)["tasks_per_s"]
    # One round trip per task, like send_task: shows what batching buys.
    single = subprocess.run(
        [binary, "bench", "publish", "--redis-url", url, "--tasks", str(tasks), "--batch", "1",
         "--json"],
        check=True, capture_output=True, text=True,
    )
    rust_single = json.loads(single.stdout)["tasks_per_s"]
    ratio = rust / py
    print(f"publishing to Redis ({url}):")
    print(f"  Python Celery send_task        {py:>10.0f} tasks/s ({tasks} tasks)")
    print(f"  Rust producer (batches of 1000) {rust:>9.0f} tasks/s ({tasks * 5} tasks)")
    print(f"  Rust producer, unbatched        {rust_single:>9.0f} tasks/s ({tasks} tasks)")
    verdict = "met" if ratio >= 10 else "NOT MET"
    print(f"  ratio                          {ratio:>10.1f}x   goal >= 10x: {verdict}")


if __name__ == "__main__":
    main()
