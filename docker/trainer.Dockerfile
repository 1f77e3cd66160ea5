# The trainer of docker-compose.yml: runs `mlflow run . -e loso --env-manager local` against the
# tracking server. Build context: the repository root (see .dockerignore).
FROM python:3.11-slim-bookworm

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# git: `mlflow run` records the source version when the project is a git checkout.
RUN apt-get update \
    && apt-get install -y --no-install-recommends git \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /app
# Requirements first, so code edits do not re-install TensorFlow.
COPY requirements.txt .
RUN pip install -r requirements.txt

COPY . .
RUN pip install --no-deps -e .

# An unprivileged user; the download/prepared-data cache is a volume owned by it.
RUN useradd --create-home --uid 1000 ecg && mkdir -p /cache && chown ecg /cache /app
USER ecg
ENV ECG_CACHE_DIR=/cache

CMD ["mlflow", "run", ".", "-e", "loso", "--env-manager", "local"]
