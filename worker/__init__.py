"""The video pipeline, its storage and (later) the queue."""
