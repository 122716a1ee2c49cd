"""The Celery application: JSON messages only, late acks, one task at a time per worker process.

Settings come from the environment (never logged with credentials):
- FERVID_BROKER_URL: Redis URL (default redis://localhost:6379/0; a password goes in the URL).
- FERVID_SEGMENT_TIME_LIMIT_S: seconds one segment may run (default 3600; worker.settings.QueuePolicy).

Redis' visibility timeout is longer than a segment may run, so Redis never hands a running segment out twice.
It is not what recovers from a dead worker: segment leases in the database and the sweeper do that, in about a
minute (worker.queue.jobs, worker.queue.sweeper); a message that Redis restores hours later finds its segment done
and does nothing.
"""

from __future__ import annotations

import os

from celery import Celery

from fervid.worker.settings import QueuePolicy

SEGMENT_TIME_LIMIT = QueuePolicy.from_env().segment_time_limit_s
VISIBILITY_TIMEOUT = 2 * SEGMENT_TIME_LIMIT + 300
QUEUE = "fervid"
PRIORITY_STEPS = list(range(10))
SEP = ":"


def broker_url() -> str:
    return os.environ.get("FERVID_BROKER_URL", "redis://localhost:6379/0")


app = Celery("fervid", include=["fervid.worker.queue.tasks"])
app.conf.update(
    broker_url=broker_url(),
    task_serializer="json",
    accept_content=["json"],  # never pickle: a message must not be able to run code
    result_serializer="json",
    task_ignore_result=True,  # the database holds the results and is the barrier between segments
    task_acks_late=True,  # a message is acknowledged after its segment is written...
    task_reject_on_worker_lost=True,  # ...and goes back to the queue at once if its process dies
    worker_prefetch_multiplier=1,  # a long segment must not hold other messages hostage
    task_default_queue=QUEUE,
    task_soft_time_limit=SEGMENT_TIME_LIMIT,
    task_time_limit=SEGMENT_TIME_LIMIT + 60,
    broker_transport_options={
        "visibility_timeout": VISIBILITY_TIMEOUT,
        "queue_order_strategy": "priority",
        "priority_steps": PRIORITY_STEPS,
        "sep": SEP,
    },
    broker_connection_retry_on_startup=True,
    broker_connection_max_retries=None,  # Redis restarting is an outage to wait out, not a reason to exit
    worker_hijack_root_logger=False,
    worker_send_task_events=False,
)
