"""The Celery application: JSON messages only, late acks, one task at a time per worker process.

Settings come from the environment (never logged with credentials):
- FERVID_BROKER_URL: Redis URL (default redis://localhost:6379/0; a password goes in the URL).
- FERVID_SEGMENT_TIME_LIMIT: seconds one segment may run (default 3600); the Redis visibility timeout is
  longer than that, so a running segment is never handed out twice, while one whose worker died is.
- FERVID_VISIBILITY_TIMEOUT: override of that timeout (seconds).
"""

from __future__ import annotations

import os

from celery import Celery

SEGMENT_TIME_LIMIT = int(os.environ.get("FERVID_SEGMENT_TIME_LIMIT", "3600"))
VISIBILITY_TIMEOUT = int(os.environ.get("FERVID_VISIBILITY_TIMEOUT", str(2 * SEGMENT_TIME_LIMIT + 300)))
QUEUE = "fervid"


def broker_url() -> str:
    return os.environ.get("FERVID_BROKER_URL", "redis://localhost:6379/0")


app = Celery("fervid", include=["worker.tasks"])
app.conf.update(
    broker_url=broker_url(),
    task_serializer="json",
    accept_content=["json"],  # never pickle: a message must not be able to run code
    result_serializer="json",
    task_ignore_result=True,  # the database holds the results and is the barrier between segments
    task_acks_late=True,  # a message is acknowledged after its segment is written...
    task_reject_on_worker_lost=True,  # ...and goes back to the queue if its process dies
    worker_prefetch_multiplier=1,  # a long segment must not hold other messages hostage
    task_default_queue=QUEUE,
    task_soft_time_limit=SEGMENT_TIME_LIMIT,
    task_time_limit=SEGMENT_TIME_LIMIT + 60,
    broker_transport_options={
        "visibility_timeout": VISIBILITY_TIMEOUT,
        "queue_order_strategy": "priority",
        "priority_steps": list(range(10)),
        "sep": ":",
    },
    broker_connection_retry_on_startup=True,
    broker_connection_max_retries=None,  # Redis restarting is an outage to wait out, not a reason to exit
    worker_hijack_root_logger=False,
    worker_send_task_events=False,
)
