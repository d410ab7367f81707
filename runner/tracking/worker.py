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
# the calls that write into the run whose id is their first argument
RUN_WRITES = (
    "log_params",
    "log_metric_steps",
    "set_tags",
    "log_text",
    "log_figure",
    "log_arrays",
    "log_artifact",
    "log_evaluation",
)


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


def encode(reply: tuple, method: str) -> bytes:
    """The answer as bytes the caller can always load: an exception that pickles but does not
    unpickle (some MLflow exceptions take other constructor arguments) would kill the caller's
    reader, so it goes as a RuntimeError with the original type and message."""
    try:
        payload = pickle.dumps(reply)
        pickle.loads(payload)
        return payload
    except Exception:  # noqa: BLE001 (an unpicklable result or exception)
        error = reply[1] if not reply[0] else None
        text = f"{type(error).__name__}: {error}" if error is not None else f"{method} returned an unpicklable result"
        return pickle.dumps((False, RuntimeError(text), reply[2] if len(reply) > 2 else traceback.format_exc()))


def bound_http_retries() -> None:
    """MLflow retries an unreachable server for minutes by default: a few seconds here, unless set."""
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")


def main() -> None:
    # Ctrl+C and SIGTERM reach the whole process group; the job decides how its runs end (KILLED)
    # and needs this process alive to record that.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    # Normal priority: the job waits for this process (run ids, the end of a run), so on a machine
    # busy with other work a lower priority starved it until the job gave up (nice 19 at load 4.5 on
    # 2 cores: no answer in 30 s, a local SQLite job failed)
    bound_http_retries()
    calls, answers = sys.stdin.buffer, os.fdopen(os.dup(sys.stdout.fileno()), "wb")
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())  # stray prints must not corrupt the answers
    from runner.tracking.mlflow_tracker import MlflowTracker

    tracker = None
    failed: set[str] = set()  # runs with a write that failed: they never end FINISHED
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
                if method == "end_run" and args[0] in failed and args[1:2] in ((), ("FINISHED",)):
                    args = (args[0], "FAILED")  # ended without waiting (Tracker.run(wait=False))
                reply = (True, getattr(tracker, method)(*args, **kwargs))
        except Exception as e:  # noqa: BLE001 (every error goes back to the caller)
            reply = (False, e, traceback.format_exc())
            if method in RUN_WRITES and args:
                failed.add(args[0])
        send(answers, encode(reply, method))


if __name__ == "__main__":
    from runner.quiet import quiet_libraries

    quiet_libraries()
    main()
