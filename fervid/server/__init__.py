"""`fervid serve`: the jobs and timelines over HTTP (FastAPI on uvicorn). The business logic stays in
fervid.worker (queue.client, queue.jobs, store.query, store.export); this package is HTTP around it."""
