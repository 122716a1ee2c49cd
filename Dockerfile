# The fervid image for docker-compose.yml: the package, its dependencies and the shipped weights.
FROM python:3.11-slim
RUN apt-get update && apt-get install -y --no-install-recommends libgl1 libglib2.0-0 && rm -rf /var/lib/apt/lists/*
# Workers decode untrusted videos: a decoder exploit must not run as root in the container. The uid can be
# set to that of the owner of the media (docker compose build --build-arg FERVID_UID=...) where they are not
# world-readable.
ARG FERVID_UID=1000
RUN useradd --create-home --uid "${FERVID_UID}" --user-group --shell /usr/sbin/nologin fervid
WORKDIR /app
# The code stays root-owned: the user runs it but cannot change it.
COPY pyproject.toml README.md ./
COPY fervid fervid
COPY model model
COPY training training
COPY worker worker
RUN pip install --no-cache-dir .
# Convert the detector's weights at build time, so containers start without it. As the user that reads them, into
# a cache it owns (its home also holds the default SQLite database, FERVID_HOME); the check fails the build
# where the cache could not be written (load_retinaface() only warns, and every start would convert again).
ENV FERVID_CACHE_DIR=/home/fervid/.cache/fervid
USER fervid
RUN python -c "from fervid.model.retinaface import cache_path, load_retinaface; load_retinaface('cpu'); \
assert cache_path().is_file(), cache_path()"
