"""How scoring over HTTP fails: one pair of errors for the scorer and the server tokenizer.

``negablate eval`` catches :class:`ScoringError` and reports it in one line; the
server's own answer (status, message, endpoint) rides on :class:`ServerError`.
"""

from __future__ import annotations


class ScoringError(RuntimeError):
    """Scoring failed (bad response, server error after retries, ...)."""


class ServerError(ScoringError):
    """The server answered with an error; ``status`` is the HTTP status."""

    def __init__(self, status: int, message: str, url: str) -> None:
        self.status = status
        self.message = message
        self.url = url
        super().__init__(f"{url} answered {status}: {message}")
