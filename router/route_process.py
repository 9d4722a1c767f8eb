"""The child-process :class:`~router.prompt_reader.PromptReader`: token counts and
classifications worked out in a child process, with its own GIL (why: the
:mod:`router.prompt_reader` module doc).

The child (``python -m router.route_process``) holds the target's tokenizer (sent by the
parent, so counts are exactly the parent's) and the current classifier, loaded from its
directory and checked against the fingerprint the parent expects. Parent and child exchange
length-prefixed pickles over the child's stdin and stdout, one batch at a time:

    parent -> child: ("init", tokenizer_json, spin_s)    once; the child answers ("ready",)
                     ("batch", model_texts, classifier_texts, (directory, fingerprint))
    child -> parent: ("ok", token_counts, classifications)
                     ("stale", message)   the directory holds another classifier now
                     ("error", message)

The parent reads replies on the event loop (``add_reader``), so no thread of the
sidecar waits on the child, and writes batches without blocking. If the child fails,
dies or is silent for ``reply_timeout_s``, :class:`ChildProcessReader` reads that batch
in-process (:class:`~router.prompt_reader.InProcessReader`) and the child is killed and
restarted in the background.

With ``spin_s`` (``limits.prompt_reader_spin_ms``; off by default), after a batch of one
the child busy-waits, yielding the CPU, for up to that long before it blocks on its pipe,
so that the next batch is taken without waking a sleeping process. That helps on a host
where waking an idle vCPU is slow: on a 2-vCPU KVM guest that never polls before halting
(``guest_halt_poll_ns`` 0), 2 ms raised Route at concurrency 64 from 0.51-0.61 to
0.73-0.81 of echo and cut the concurrency-1 p50 from 1.13-1.17 to 0.93-0.97 ms, side by
side (benchmarks/load/HISTORY.md, 2026-12-02); on a loaded machine it did nothing. It
costs up to ``spin_s`` of CPU per lone batch.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import pickle
import select
import signal
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from typing import IO, TYPE_CHECKING, Any

from classifiers.api import ClassifierLoadError
from router.logs import configure_child_logging
from router.prompt_reader import InProcessReader, PromptsRead

if TYPE_CHECKING:
    from classifiers.api import Classification
    from classifiers.holder import ClassifierHolder

logger = logging.getLogger(__name__)

_HEADER = struct.Struct("<I")
READY_TIMEOUT_S = 120.0  # the child's start-up (imports, tokenizer)
REPLY_TIMEOUT_S = 10.0  # a batch; a child silent for longer is killed and restarted
RESTART_AFTER_S = 5.0  # at most one start per this many seconds after a failure
EXIT_WAIT_S = 0.1  # a dead child reaped, for its status in the log line

ClassifierKey = tuple[str, str]  # (directory, the classifier's fingerprint)


class RouteProcessError(RuntimeError):
    """The child could not do a batch (it failed, is gone or not ready)."""


class ClassifierChangedError(RouteProcessError):
    """The directory of the classifier served holds another one now (written over in
    place): the child cannot load the served one until a reload serves another."""


def _frame(message: Any) -> bytes:
    body = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
    return _HEADER.pack(len(body)) + body


def _read_exact(stream: IO[bytes], size: int) -> bytes:
    data = bytearray()
    while len(data) < size:
        chunk = stream.read(size - len(data))
        if not chunk:
            raise EOFError("stream closed")
        data += chunk
    return bytes(data)


def _write_all(stream: IO[bytes], data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[stream.write(view) or 0 :]


def read_message(stream: IO[bytes]) -> Any:
    """One framed message from a blocking stream; EOFError at its end."""
    (size,) = _HEADER.unpack(_read_exact(stream, _HEADER.size))
    return pickle.loads(_read_exact(stream, size))


class _Child:
    """One running child: its process, and the frames read from it so far."""

    def __init__(self, process: subprocess.Popen[bytes]) -> None:
        self.process = process
        assert process.stdin is not None and process.stdout is not None
        self.stdin = process.stdin
        self.stdout = process.stdout
        self.buffer = bytearray()  # bytes read from the child, not yet a whole message
        self.outbox = bytearray()  # bytes for the child, not yet written
        self.loop: asyncio.AbstractEventLoop | None = None  # the loop reading its replies
        self.writing = False  # the loop waits to write the rest of the outbox

    def send(self, message: Any) -> None:
        """Write a message, blocking (before the event loop takes the pipes over)."""
        _write_all(self.stdin, _frame(message))

    def take_messages(self) -> list[Any]:
        """The complete messages in the buffer (removed from it)."""
        messages = []
        while len(self.buffer) >= _HEADER.size:
            (size,) = _HEADER.unpack_from(self.buffer)
            end = _HEADER.size + size
            if len(self.buffer) < end:
                break
            messages.append(pickle.loads(bytes(self.buffer[_HEADER.size : end])))
            del self.buffer[:end]
        return messages

    def stop(self) -> None:
        for stream in (self.stdin, self.stdout):
            with contextlib.suppress(OSError):
                stream.close()
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait()

    def end_input(self, timeout_s: float = 5.0) -> None:
        """Close the child's stdin (it exits at EOF) and wait for it; kill it after
        ``timeout_s``. Its stdout stays open for the event loop's reader to see the end."""
        with contextlib.suppress(OSError):
            self.stdin.close()
        try:
            self.process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


class RouteProcess:
    """The parent's handle on the child (module doc). ``start()`` blocks until the child
    is ready (call it off the event loop, or use :meth:`start_in_background`); ``run()``
    is awaited on the event loop, one batch at a time."""

    def __init__(
        self,
        tokenizer_json: str,
        *,
        spin_s: float = 0.0,
        reply_timeout_s: float = REPLY_TIMEOUT_S,
        python: str = sys.executable,
    ) -> None:
        self._tokenizer_json = tokenizer_json
        self._spin_s = spin_s
        self._reply_timeout_s = reply_timeout_s
        self._python = python
        self._child: _Child | None = None
        self._waiting: asyncio.Future[PromptsRead] | None = None
        self._lock = threading.Lock()  # starts vs close
        # Held while a child is forked and until it has exec'd: between the two, the child
        # holds a copy of every descriptor of this process (the state directory's lock
        # among them), so close() waits for it (see close()).
        self._spawning = threading.Lock()
        self._closed = False
        self._starting = False
        self._last_start = 0.0
        self.starts = 0  # how many children were started (restarts included)
        self.batches = 0  # how many batches a child answered

    @property
    def ready(self) -> bool:
        """A child is running and answered its start-up."""
        child = self._child
        return child is not None and child.process.poll() is None

    @property
    def started(self) -> bool:
        """A child answered its start-up and has not been found lost since. Unlike
        :attr:`ready`, no system call (the Route path asks per batch): a child that died
        unnoticed fails its next batch, which is then worked on in-process."""
        return self._child is not None

    @property
    def pid(self) -> int | None:
        child = self._child
        return child.process.pid if child is not None else None

    # -- start / stop -------------------------------------------------------------------
    def start(self) -> None:
        """Start a child and wait until it has loaded the tokenizer (blocking)."""
        with self._lock:
            if self._closed:
                raise RouteProcessError("route process is closed")
            self._last_start = time.monotonic()
            self.starts += 1
        process = self._spawn()
        child = _Child(process)
        try:
            child.send(("init", self._tokenizer_json, self._spin_s))
            if not select.select([child.stdout], [], [], READY_TIMEOUT_S)[0]:
                raise OSError(f"no answer within {READY_TIMEOUT_S:g} s")
            reply = read_message(child.stdout)
        except (OSError, EOFError) as error:
            child.stop()
            raise RouteProcessError(f"route process did not start: {error}") from error
        if reply != ("ready",):
            child.stop()
            raise RouteProcessError(f"route process did not start: {reply!r}")
        with self._lock:
            if self._closed:
                child.stop()
                return
            self._child = child
        logger.info("route process %d ready", process.pid)

    def _spawn(self) -> subprocess.Popen[bytes]:
        """Fork and exec the child; Popen returns once the child has exec'd (or failed)."""
        with self._spawning:
            if self._closed:
                raise RouteProcessError("route process is closed")
            try:
                return subprocess.Popen(
                    [self._python, "-m", "router.route_process"],
                    bufsize=0,  # unbuffered: the event loop reads replies from the pipe
                    stdin=subprocess.PIPE,
                    stdout=subprocess.PIPE,
                    env={**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"},
                )
            except OSError as error:
                raise RouteProcessError(f"cannot start the route process: {error}") from error

    def start_in_background(self) -> None:
        """Start a child on a daemon thread (no-op while one runs or is starting, or
        within RESTART_AFTER_S of the last start)."""
        with self._lock:
            recent = time.monotonic() - self._last_start < RESTART_AFTER_S and self.starts
            if self._closed or self._starting or self.ready or recent:
                return
            self._starting = True
        threading.Thread(target=self._start_logged, name="route-process-start", daemon=True).start()

    def _start_logged(self) -> None:
        try:
            self.start()
        except RouteProcessError:
            logger.exception("route process failed to start; Route work stays in-process")
        finally:
            with self._lock:
                self._starting = False

    def close(self) -> None:
        """Stop the child (from any thread). A batch in flight fails on the event loop,
        when its reader sees the child's output end."""
        with self._lock:
            self._closed = True
            child, self._child = self._child, None
        # A fork in flight (a background start) holds copies of this process's descriptors
        # until its exec: wait for it, so that what the caller closes next is closed for
        # good — the state directory's flock was still held for a moment after a failed
        # start, and a retry in this process found the directory "in use".
        with self._spawning:
            pass
        if child is None:
            return
        if child.loop is not None:
            child.end_input()
        else:
            child.stop()

    # -- batches (event loop) ---------------------------------------------------------
    async def run(
        self, model_texts: Sequence[str], classifier_texts: Sequence[str], key: ClassifierKey
    ) -> PromptsRead:
        """Token counts of ``model_texts`` and classifications of ``classifier_texts`` by
        the classifier at ``key`` (directory, fingerprint). RouteProcessError if the child
        cannot, or is given a batch while it works on one (:class:`ChildProcessReader`
        waits for its turn)."""
        child = self._child
        if child is None:  # a child that died since is seen by the write or the reader
            raise RouteProcessError("route process is not running")
        if self._waiting is not None:
            raise RouteProcessError("route process is busy (one batch at a time)")
        loop = asyncio.get_running_loop()
        if child.loop is not loop:  # the first batch (on this loop)
            for stream in (child.stdin, child.stdout):  # the loop never waits on the pipes
                os.set_blocking(stream.fileno(), False)
            loop.add_reader(child.stdout.fileno(), self._readable, child)
            child.loop = loop
        waiting: asyncio.Future[PromptsRead] = loop.create_future()
        self._waiting = waiting
        child.outbox += _frame(("batch", list(model_texts), list(classifier_texts), key))
        self._flush(child)
        expiry = loop.call_later(self._reply_timeout_s, self._expire, child, waiting)
        waiting.add_done_callback(lambda _: expiry.cancel())
        # Shielded: a caller cancelled meanwhile (a Generate whose client left) cancelled
        # the batch and its expiry with it, while the batch stayed the one out; a child
        # that had hung was then never replaced, and every later batch was "busy".
        return await asyncio.shield(waiting)

    def _flush(self, child: _Child) -> None:
        """Write what the pipe takes now; the loop writes the rest when it can."""
        assert child.loop is not None
        try:
            written = os.write(child.stdin.fileno(), child.outbox)
        except BlockingIOError:
            written = 0
        except OSError as error:
            self._lost(child, f"cannot write to it: {error}")
            return
        del child.outbox[:written]
        if child.outbox and not child.writing:
            child.loop.add_writer(child.stdin.fileno(), self._flush, child)
            child.writing = True
        elif not child.outbox and child.writing:
            child.loop.remove_writer(child.stdin.fileno())
            child.writing = False

    def _expire(self, child: _Child, waiting: asyncio.Future[PromptsRead]) -> None:
        if not waiting.done():
            self._lost(child, f"no reply within {self._reply_timeout_s:g} s")

    def _readable(self, child: _Child) -> None:
        try:
            data = os.read(child.stdout.fileno(), 1 << 20)
        except BlockingIOError:  # nothing to read after all
            return
        except OSError as error:
            self._lost(child, str(error))
            return
        if not data:
            self._lost(child, f"it exited with {_exit_status(child.process)}")
            return
        child.buffer += data
        for message in child.take_messages():
            self._answer(message)

    def _answer(self, message: Any) -> None:
        waiting, self._waiting = self._waiting, None
        if waiting is None or waiting.done():
            return
        if message[0] == "ok":
            self.batches += 1
            waiting.set_result(PromptsRead(message[1], message[2]))
        elif message[0] == "stale":
            waiting.set_exception(ClassifierChangedError(str(message[1])))
        else:
            waiting.set_exception(RouteProcessError(str(message[1])))

    def _lost(self, child: _Child, why: str) -> None:
        """On the event loop: the child ended or broke; fail its batch, restart it."""
        if child.loop is not None:
            child.loop.remove_reader(child.stdout.fileno())
            if child.writing:
                child.loop.remove_writer(child.stdin.fileno())
                child.writing = False
            child.loop = None
        with self._lock:
            if self._child is child:
                self._child = None
            closed = self._closed
        child.stop()
        self._fail(RouteProcessError(f"route process lost: {why}"))
        if not closed:
            logger.error("route process %d lost (%s); restarting it", child.process.pid, why)
            delay = max(0.0, self._last_start + RESTART_AFTER_S - time.monotonic())
            asyncio.get_running_loop().call_later(delay, self.start_in_background)

    def _fail(self, error: RouteProcessError) -> None:
        waiting, self._waiting = self._waiting, None
        if waiting is not None and not waiting.done():
            waiting.set_exception(error)


class ChildProcessReader:
    """:class:`~router.prompt_reader.PromptReader` through a :class:`RouteProcess` (its
    ``process``).

    A batch the child cannot read is read in-process, so that no call fails for the
    child's sake: before the child has started (or while it restarts, which a batch
    starts in the background, at most once per RESTART_AFTER_S), when the child fails the
    batch or is lost, and when the current classifier was not loaded from a directory (the
    child loads it from there). Batches go to the child one at a time: a caller that
    comes while one is out (a Generate beside a Route batch) waits for its turn."""

    def __init__(
        self,
        tokenizer: Any,
        classifiers: ClassifierHolder,
        *,
        spin_s: float = 0.0,
        reply_timeout_s: float = REPLY_TIMEOUT_S,
        python: str = sys.executable,
    ) -> None:
        self.process = RouteProcess(
            tokenizer.backend_tokenizer.to_str(),
            spin_s=spin_s,
            reply_timeout_s=reply_timeout_s,
            python=python,
        )
        self._in_process = InProcessReader(tokenizer, classifiers)
        self._classifiers = classifiers
        # The last classifier served and its key (None: the child cannot load it).
        self._classifier_key: tuple[object, ClassifierKey | None] | None = None
        self._turn = asyncio.Lock()

    def start(self, *, wait: bool = False) -> None:
        """Start the child: in the background, or with ``wait`` before returning (raises
        RouteProcessError if it cannot start)."""
        if wait:
            self.process.start()
        else:
            self.process.start_in_background()

    async def read(
        self, model_texts: Sequence[str], classifier_texts: Sequence[str]
    ) -> PromptsRead:
        served = self._classifiers.current
        key = self._child_key(served)
        if key is not None:
            if self.process.started:
                try:
                    async with self._turn:
                        return await self.process.run(model_texts, classifier_texts, key)
                except ClassifierChangedError as error:
                    # Not again for this classifier: each batch would load the directory
                    # in the child, fail and warn. A reload serves another and asks anew.
                    logger.warning("%s; it is read in-process until a reload", error)
                    self._classifier_key = (served, None)
                except RouteProcessError as error:
                    logger.warning("%s; this batch is read in-process", error)
            else:
                self.process.start_in_background()
        return self._in_process.read_now(model_texts, classifier_texts)

    def _child_key(self, classifier: Any) -> ClassifierKey | None:
        """(directory, fingerprint) of ``classifier`` (the one served), if the child can
        load it. The fingerprint covers classifier.json too: keyed by the graph's digest,
        a reload of the same directory with new thresholds left the child on the old."""
        cached = self._classifier_key
        if cached is None or cached[0] is not classifier:
            source = str(classifier.source)
            key = (source, classifier.fingerprint) if os.path.isdir(source) else None
            cached = self._classifier_key = (classifier, key)
        return cached[1]

    def close(self) -> None:
        self.process.close()


# -- the child ---------------------------------------------------------------------------
class _ChildState:
    """The child's tokenizer and its classifier (loaded on first use, per key)."""

    def __init__(self, tokenizer_json: str) -> None:
        from tokenizers import Tokenizer

        self.tokenizer = Tokenizer.from_str(tokenizer_json)
        self.key: ClassifierKey | None = None
        self.classifier: Any = None

    def classifier_for(self, key: ClassifierKey) -> Any:
        if key != self.key:
            from classifiers.runtime import OnnxTaskClassifier

            self.key, self.classifier = None, None
            classifier = OnnxTaskClassifier.load(key[0])
            if classifier.fingerprint != key[1]:
                raise ClassifierChangedError(
                    f"{key[0]} now holds classifier {classifier.fingerprint[:12]}, "
                    f"the sidecar serves {key[1][:12]}"
                )
            self.key, self.classifier = key, classifier
        return self.classifier

    def batch(
        self, model_texts: list[str], classifier_texts: list[str], key: ClassifierKey
    ) -> tuple[str, list[int], list[Classification]]:
        encoded = (
            self.tokenizer.encode_batch_fast(model_texts, add_special_tokens=False)
            if model_texts
            else []
        )
        classifications: list[Classification] = (
            self.classifier_for(key).classify_batch(classifier_texts) if classifier_texts else []
        )
        return ("ok", [len(encoding) for encoding in encoded], classifications)


def child_main(stdin: IO[bytes], stdout: IO[bytes]) -> None:
    """Serve batches from ``stdin`` until it closes (module doc)."""
    kind, tokenizer_json, spin_s = read_message(stdin)
    if kind != "init":
        raise SystemExit(f"route process: expected init, got {kind!r}")
    state = _ChildState(tokenizer_json)
    _write_all(stdout, _frame(("ready",)))
    while True:
        try:
            message = read_message(stdin)
        except EOFError:
            return
        reply: tuple[Any, ...]
        try:
            reply = state.batch(*message[1:])
        except ClassifierChangedError as error:
            reply = ("stale", str(error))
        except ClassifierLoadError as error:  # the served directory is gone or broken here
            reply = ("stale", f"the route process cannot load the served classifier: {error}")
        except Exception as error:  # reported to the parent, which reads the batch itself
            reply = ("error", f"{type(error).__name__}: {error}")
        _write_all(stdout, _frame(reply))
        if spin_s and len(message[1]) == 1:  # light load: the next call comes alone too
            _await_input(stdin, spin_s)


def _await_input(stdin: IO[bytes], spin_s: float) -> None:
    """Busy-wait up to ``spin_s`` for the next message, yielding the CPU to any other
    runnable task between looks (module doc)."""
    deadline = time.monotonic() + spin_s
    while time.monotonic() < deadline:
        if select.select([stdin], [], [], 0)[0]:
            return
        os.sched_yield()


def _main() -> None:
    # Ctrl-C reaches the whole process group: the child printed a KeyboardInterrupt
    # traceback and the sidecar, still stopping, logged it lost and restarted it. The
    # child ends when the sidecar closes its input.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    configure_child_logging(logging.WARNING)
    replies = os.fdopen(os.dup(1), "wb", buffering=0)
    os.dup2(2, 1)  # stray writes to stdout (C libraries included) go to stderr, not the pipe
    sys.stdout = sys.stderr
    child_main(os.fdopen(0, "rb", buffering=0), replies)


def _exit_status(process: subprocess.Popen[bytes]) -> int | str:
    """The status of a child whose output just closed: its pipe closes as it dies, a
    moment before it can be reaped (``poll()`` said None for half of the kills). Waited
    for briefly, on the event loop: only a child's death comes here."""
    try:
        return process.wait(timeout=EXIT_WAIT_S)
    except subprocess.TimeoutExpired:
        return "no status yet (its output closed)"


if __name__ == "__main__":
    _main()
