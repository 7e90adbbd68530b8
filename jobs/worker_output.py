"""Ray's, vLLM's and other libraries' output during a run goes to a log file instead of the terminal.

Their messages come from Python loggers, `print`, `warnings` and native code (Ray's core worker writes to file
descriptor 2 itself), so the process's descriptors 1 and 2 are pointed at the file; llmbatch's own lines and
view keep the terminal through duplicates of the original descriptors."""
from __future__ import annotations

import os
import sys
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, TextIO


@dataclass
class Terminal:
    """The original standard output and error, and the log file that now receives everything else."""
    out: TextIO
    err: TextIO
    log: TextIO


class Tee:
    """A text stream that writes to several: llmbatch's log lines reach the terminal and the log file."""

    def __init__(self, *streams: TextIO):
        self.streams = streams

    def write(self, text: str) -> int:
        for stream in self.streams:
            stream.write(text)
        return len(text)

    def flush(self) -> None:
        for stream in self.streams:
            stream.flush()

    def isatty(self) -> bool:
        return self.streams[0].isatty()


@contextmanager
def worker_output_to(log_path: Path) -> Iterator[Terminal]:
    """Descriptors 1 and 2 write to `log_path` (appended) until the block ends; yields the terminal's streams.
    OSError when the log file cannot be opened, with nothing changed."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    with ExitStack() as opened:
        log_fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        opened.callback(os.close, log_fd)
        streams = Terminal(_stream(opened, os.dup(1), "w"), _stream(opened, os.dup(2), "w"),
                           _stream(opened, os.dup(log_fd), "a"))
        saved = {}
        try:
            for fd in (1, 2):
                saved[fd] = os.dup(fd)
                os.dup2(log_fd, fd)
            yield streams
        finally:
            for stream in (sys.stdout, sys.stderr):
                try:
                    stream.flush()
                except (OSError, ValueError):
                    pass
            for fd, original in saved.items():
                os.dup2(original, fd)
                os.close(original)


def _stream(opened: ExitStack, fd: int, mode: str) -> TextIO:
    try:
        stream = os.fdopen(fd, mode, buffering=1, encoding="utf-8", errors="replace")
    except BaseException:
        os.close(fd)
        raise
    opened.callback(_close_quietly, stream)
    return stream


def _close_quietly(stream: TextIO) -> None:
    try:
        stream.close()
    except OSError:
        pass
