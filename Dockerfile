# The fervid image for docker-compose.yml: the package, its dependencies and the shipped weights.
FROM python:3.11-slim
RUN apt-get update && apt-get install -y --no-install-recommends libgl1 libglib2.0-0 && rm -rf /var/lib/apt/lists/*
WORKDIR /app
COPY pyproject.toml README.md ./
COPY fervid fervid
COPY model model
COPY training training
COPY worker worker
RUN pip install --no-cache-dir .
# Convert the detector's weights at build time, so containers start without it.
RUN python -c "from model.retinaface import load_retinaface; load_retinaface('cpu')"
