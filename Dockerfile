# One image for every streamrec role (worker, api, feeds, produce); the command picks the role.
FROM python:3.11-slim
RUN apt-get update && apt-get install -y --no-install-recommends build-essential \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /app
COPY requirements/runtime.txt requirements/runtime.txt
RUN pip install --no-cache-dir --require-hashes -r requirements/runtime.txt
COPY pyproject.toml README.md ./
COPY schemas schemas
COPY stream stream
COPY online_models online_models
COPY state state
COPY serving serving
COPY infra infra
COPY replay replay
RUN pip install --no-cache-dir --no-deps .
RUN useradd --system streamrec
USER streamrec
ENTRYPOINT ["streamrec"]
