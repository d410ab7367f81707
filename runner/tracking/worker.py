"""The MLflow worker process behind BackgroundTracker: `python -m runner.tracking.worker`.

It reads calls from stdin and answers each one, in order, on stdout (length-prefixed pickles):
a call is (method, args, kwargs) on an MlflowTracker; an answer is (True, result) or
(False, exception, traceback text). The first call is ("start", (uri, experiment,
artifact_location), {}). It exits when stdin closes, which is also what happens when the process
that started it dies, however it died.
"""
from __future__ import annotations

import os
import pickle
import signal
import struct
import sys
import traceback
from typing import BinaryIO

HEADER = struct.Struct("!Q")


def send(stream: BinaryIO, payload: bytes) -> None:
    stream.write(HEADER.pack(len(payload)) + payload)
    stream.flush()


def receive(stream: BinaryIO) -> bytes:
    """One message; EOFError when the stream ends."""
    header = stream.read(HEADER.size)
    if len(header) < HEADER.size:
        raise EOFError
    (size,) = HEADER.unpack(header)
    payload = stream.read(size)
    if len(payload) < size:
        raise EOFError
    return payload


def main() -> None:
    # Ctrl+C and SIGTERM reach the whole process group; the job decides how its runs end (KILLED)
    # and needs this process alive to record that.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    calls, answers = sys.stdin.buffer, os.fdopen(os.dup(sys.stdout.fileno()), "wb")
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())  # stray prints must not corrupt the answers
    from runner.tracking.mlflow_tracker import MlflowTracker

    tracker = None
    while True:
        try:
            method, args, kwargs = pickle.loads(receive(calls))
        except EOFError:
            return
        try:
            if method == "start":
                tracker = MlflowTracker(*args)
                tracker.open()
                reply: tuple = (True, None)
            else:
                reply = (True, getattr(tracker, method)(*args, **kwargs))
        except Exception as e:  # noqa: BLE001 (every error goes back to the caller)
            reply = (False, e, traceback.format_exc())
        try:
            payload = pickle.dumps(reply)
        except Exception:  # noqa: BLE001 (an unpicklable result or exception)
            payload = pickle.dumps((False, RuntimeError(f"MLflow worker: {method} failed"), traceback.format_exc()))
        send(answers, payload)


if __name__ == "__main__":
    main()
