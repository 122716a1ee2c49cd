"""Video to emotion timelines, in three parts, each importing only those before it:

- `pipeline`: frames to rows, without a database (decoding, face crops, the models, face tracking);
- `store`: the database (schema, migrations, connections), writing rows, queries and exports;
- `queue`: the job lifecycle and the Celery queue (tasks, workers, their supervisor and sweeper).

Beside them: `settings` (every setting and default, read by all three) and `render` (plots and annotated videos,
from the store's rows and the pipeline's frames).
"""
