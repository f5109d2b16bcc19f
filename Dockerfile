# One image for every process; compose picks the command (api, relay, worker, migrate).
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

RUN useradd --create-home --uid 10001 app
WORKDIR /app

# pyproject.toml also carries the Alembic configuration that migrate reads at run time.
COPY pyproject.toml README.md ./
COPY services ./services
COPY db ./db
RUN pip install --no-cache-dir .

USER app
EXPOSE 8080
CMD ["python", "-m", "services.api"]
