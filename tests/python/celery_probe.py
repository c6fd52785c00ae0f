"""A Celery app for the tests: one task that records what it received in Redis."""

import json
import os

import redis

from ccat_workflow_manager.celery_app import make_app

REDIS_URL = os.environ["CCAT_TEST_REDIS_URL"]
PREFIX = os.environ["CCAT_PROBE_PREFIX"]

app = make_app(REDIS_URL, global_keyprefix=PREFIX)


@app.task(name="ccat.probe.record", bind=True)
def record(self, *args, **kwargs):
    info = self.request.delivery_info or {}
    redis.Redis.from_url(REDIS_URL).set(
        f"{PREFIX}probe:{self.request.id}",
        json.dumps({"args": args, "kwargs": kwargs, "routing_key": info.get("routing_key")}),
        ex=600,
    )
