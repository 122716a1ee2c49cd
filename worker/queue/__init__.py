"""Jobs through their lifecycle, in this process or on the Celery queue: tasks, workers, sweeper, clients."""
