FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml README.md ./
COPY streamer ./streamer
RUN pip install --no-cache-dir .
EXPOSE 9100
ENTRYPOINT []
CMD ["streamer", "run"]
