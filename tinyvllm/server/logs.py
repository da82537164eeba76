"""Logging for the server: human-readable lines, or one JSON object per line (`--log-format json`) for log shippers.

Fields passed with `extra=` (request ids, token counts, the access log's status and size) become JSON keys:

    {"time": "2025-01-01T12:00:00.123Z", "level": "INFO", "logger": "tinyvllm.server",
     "message": "request finished", "request_id": "cmpl-9f", "completion_tokens": 16, "finish_reason": "length"}
"""
from __future__ import annotations
import json
import logging
from datetime import datetime, timezone

_STANDARD_FIELDS = set(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {"message", "asctime", "taskName"}


class JSONFormatter(logging.Formatter):
  def format(self, record: logging.LogRecord) -> str:
    entry = {"time": datetime.fromtimestamp(record.created, timezone.utc).isoformat(timespec="milliseconds"),
             "level": record.levelname, "logger": record.name, "message": record.getMessage()}
    entry |= {k: v for k, v in vars(record).items() if k not in _STANDARD_FIELDS}
    if record.exc_info: entry["exception"] = self.formatException(record.exc_info)
    return json.dumps(entry, default=str)


def setup_logging(fmt: str = "text", level: int = logging.INFO) -> None:
  handler = logging.StreamHandler()
  handler.setFormatter(JSONFormatter() if fmt == "json" else logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
  logging.basicConfig(level=level, handlers=[handler], force=True)
