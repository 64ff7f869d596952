"""Shared fixtures: a real daemon subprocess on a free loopback port, and leak checks."""

from __future__ import annotations

import asyncio
import gc
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import traceback
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextvars import ContextVar
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import structlog
from blockbuster import BlockingError, blockbuster_ctx
from hypothesis import HealthCheck, settings
from pytest_asyncio import is_async_test

# Property and fuzz tests: a bounded run in `make test`, a long one under `make fuzz`.
settings.register_profile("ci", max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("fuzz", max_examples=20_000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

REPO = Path(__file__).resolve().parent.parent
MODELS_DIR = Path(os.environ.get("MONGARSD_TEST_MODELS", REPO / "models"))
READY_TIMEOUT_S = 90.0


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def run_cli(*args: str, env: dict[str, str] | None = None, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """Run `python -m mongarsd ARGS` and capture its output."""
    return subprocess.run(
        [sys.executable, "-m", "mongarsd", *args],
        env={**{k: v for k, v in os.environ.items() if not k.startswith("MONGARSD_TEST_")}, **(env or {})},
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=REPO,
    )


@dataclass
class Http:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


def http(
    method: str, url: str, body: Any = None, *, token: str | None = None, headers: dict[str, str] | None = None, timeout: float = 60
) -> Http:
    """Make one real HTTP request with the standard library (curl-style)."""
    data = None
    hdrs = dict(headers or {})
    if body is not None:
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        hdrs.setdefault("Content-Type", "application/json")
    if token:
        hdrs["Authorization"] = f"Bearer {token}"
    req = urllib.request.Request(url, data=data, method=method, headers=hdrs)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return Http(resp.status, dict(resp.headers), resp.read())
    except urllib.error.HTTPError as err:
        with err:
            return Http(err.code, dict(err.headers), err.read())


@dataclass
class DaemonProc:
    proc: subprocess.Popen[bytes]
    port: int
    state_dir: Path
    log_path: Path
    host: str = "127.0.0.1"
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def get(self, path: str, **kw: Any) -> Http:
        return http("GET", self.url + path, **kw)

    def post(self, path: str, body: Any = None, **kw: Any) -> Http:
        return http("POST", self.url + path, body, **kw)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        return int(self.proc.returncode)


def start_daemon(
    tmp: Path,
    *,
    env: dict[str, str] | None = None,
    args: list[str] | None = None,
    port: int | None = None,
    state_dir: Path | None = None,
    wait_ready: bool = True,
    models: bool = False,
) -> DaemonProc:
    """Start `mongarsd run` as a user would; by default without loading models."""
    port = port or free_port()
    state_dir = state_dir or tmp / "state"
    log_path = tmp / f"daemon-{port}.log"
    base_env = {
        "MONGARSD_LOG__FORMAT": "json",
        "MONGARSD_LOG__LEVEL": "debug",
        "MONGARSD_CONFIG": str(tmp / "none.toml") if not (env or {}).get("MONGARSD_CONFIG") else env["MONGARSD_CONFIG"],  # type: ignore[index]
        "PYTHONUNBUFFERED": "1",
    }
    if not models:
        base_env["MONGARSD_INFERENCE__PRELOAD"] = "false"
        base_env["MONGARSD_EMBED__PRELOAD"] = "false"
    if "MONGARSD_CONFIG" not in (env or {}):
        (tmp / "none.toml").write_text("")
    cmd = [
        sys.executable,
        "-m",
        "mongarsd",
        "run",
        "--port",
        str(port),
        "--state-dir",
        str(state_dir),
        "--models-dir",
        str(MODELS_DIR),
        *(args or []),
    ]
    with log_path.open("ab") as fh:
        # the daemon refuses unknown MONGARSD_* variables: the test suite's own (MONGARSD_TEST_MODELS) stay here
        inherited = {k: v for k, v in os.environ.items() if not k.startswith("MONGARSD_TEST_")}
        proc = subprocess.Popen(cmd, env={**inherited, **base_env, **(env or {})}, stdout=fh, stderr=subprocess.STDOUT, cwd=REPO)
    d = DaemonProc(proc, port, state_dir, log_path)
    if wait_ready:
        wait_until_ready(d)
    return d


def wait_until_ready(d: DaemonProc, timeout: float = READY_TIMEOUT_S) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if d.proc.poll() is not None:
            raise AssertionError(f"daemon exited with {d.proc.returncode}:\n{d.log()[-4000:]}")
        try:
            if d.get("/ready", timeout=2).status == 200:
                return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(0.05)
    d.stop(signal.SIGKILL)
    raise AssertionError(f"daemon not ready within {timeout}s:\n{d.log()[-4000:]}")


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[DaemonProc]:
    """A daemon without models, for tests of the foundation."""
    d = start_daemon(tmp_path)
    yield d
    d.stop()


# ---- Default models: skipped on a developer machine without them, a failure under CI ----------

DEFAULT_LLM = MODELS_DIR / "SmolLM2-135M-Instruct-Q4_1.gguf"
DEFAULT_EMBED_DIR = MODELS_DIR / "all-minilm-l6-v2"
DEFAULT_EMBEDDER = DEFAULT_EMBED_DIR / "model.int8.onnx"


def in_ci() -> bool:
    """Tell whether the tests run under CI (`CI=true`, as GitHub Actions and most runners set it)."""
    return os.environ.get("CI", "").strip().lower() in {"1", "true", "yes"}


def requires_models(*paths: Path) -> pytest.MarkDecorator:
    """Mark tests that need the default models (both unless PATHS names some)."""
    return pytest.mark.requires_models(*(paths or (DEFAULT_LLM, DEFAULT_EMBEDDER)))


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "requires_models(*paths): needs these model files (see requires_models)")
    # structlog's default console renderer formats tracebacks with rich when it is installed (a
    # test dependency pulls it in), which reads source files inside the event loop: plain ones
    processors = [
        structlog.dev.ConsoleRenderer(exception_formatter=structlog.dev.plain_traceback)
        if isinstance(p, structlog.dev.ConsoleRenderer)
        else p
        for p in structlog.get_config()["processors"]
    ]
    structlog.configure(processors=processors)


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    # Before any fixture: a module-scoped fixture would otherwise try to load the missing model.
    missing = sorted({str(p) for mark in item.iter_markers("requires_models") for p in mark.args if not Path(p).exists()})
    if not missing:
        return
    msg = f"default models not installed: {', '.join(missing)} (run `make models`, or set MONGARSD_TEST_MODELS)"
    if in_ci():
        pytest.fail(f"{msg}; under CI the model tests must run, not skip", pytrace=False)
    pytest.skip(msg)


# ---- Cleanup checks (STYLE rule 14): tasks, threads, descriptors, blocking calls in the loop -----

THREAD_GRACE_S = 5.0
FD_GRACE_S = 2.0
FD_POLL_S = 0.05
# Loop iterations a finished test gets to deliver cancellations it requested without awaiting them.
TASK_SETTLE_TICKS = 3
TASK_CANCEL_TIMEOUT_S = 5.0
# Threads that outlive a test by design: the default executor's workers (asyncio.to_thread) belong
# to the loop and stop when pytest-asyncio closes it, after these checks.
_POOL_THREAD_PREFIXES = ("asyncio_", "ThreadPoolExecutor")
# Code whose blocking calls in the loop fail a test; third-party code is judged by who called it.
_SCANNED_PACKAGES = ["mongarsd", "tests"]
# Blocking calls allowed in the loop, each with why: (blockbuster function, file suffix, functions).
_BLOCKING_ALLOWED: list[tuple[str, str, set[str]]] = []
# A module's first import may block (zeroconf's forks ldconfig through ctypes.util): exempt, since
# it happens once per process and flagging it would make a test's result depend on the tests
# before it. A lazy import of heavy modules on the loop is a review matter, not a test one.
_IMPORT_FRAME = ("<frozen importlib._bootstrap>", {"_find_and_load"})

# Files third-party code opens once and keeps for the life of the process, so the first test to
# use it is not charged: files held by module attributes, (module, attributes)...
_PROCESS_FILES = [("llama_cpp._utils", ("outnull_file", "errnull_file"))]  # /dev/null, opened at import
# ...and paths native code keeps open: onnxruntime's device database, from the first InferenceSession.
_PROCESS_PATHS = re.compile(r"/\.onnxruntime/onnxruntime\.db(-wal|-shm|-journal)?$")

_CURRENT_TEST: ContextVar[str | None] = ContextVar("mongarsd_current_test", default=None)
_FAILED_CALL = pytest.StashKey[bool]()
_FAILED_BLOCKING = pytest.StashKey[bool]()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[pytest.TestReport]:
    report: pytest.TestReport = yield
    if report.when in ("setup", "call") and report.failed:
        # A test that already failed (or errored in setup) is not also charged with what its failure
        # left running, nor told twice about the blocking call it failed on.
        item.stash[_FAILED_CALL] = True
        if call.excinfo is not None and call.excinfo.errisinstance(BlockingError):
            item.stash[_FAILED_BLOCKING] = True
    return report


def _open_fds() -> dict[int, str] | None:
    """Map each open descriptor of this process to what it points at; None where /proc is absent."""
    try:
        names = os.listdir("/proc/self/fd")
    except FileNotFoundError:
        return None
    fds: dict[int, str] = {}
    for name in names:
        try:
            fds[int(name)] = os.readlink(f"/proc/self/fd/{name}")
        except OSError:
            # The listing's own descriptor (closed by now), or one another thread closed meanwhile.
            continue
    return fds


def _loop_runner(request: pytest.FixtureRequest) -> tuple[asyncio.Runner, str] | None:
    """Return the asyncio.Runner pytest-asyncio runs this test in and its loop scope; None for sync tests."""
    item = request.node
    if not is_async_test(item):
        return None
    marker = item.get_closest_marker("asyncio")
    kwargs = marker.kwargs if marker else {}
    scope = str(kwargs.get("loop_scope") or kwargs.get("scope") or item.config.getini("asyncio_default_test_loop_scope") or "function")
    # pytest-asyncio (>= 1.1) runs tests and async fixtures in the Runner of this private fixture.
    # Asking for it here opens a function-scoped loop before the descriptor snapshot and keeps it
    # open until after the checks.
    try:
        runner = request.getfixturevalue(f"_{scope}_scoped_runner")
    except pytest.FixtureLookupError as err:
        raise RuntimeError(f"pytest-asyncio changed: no _{scope}_scoped_runner fixture; update verify_cleanup") from err
    return runner, scope


class _TestTasks:
    """Record the tasks a test creates on a loop it shares with the tests around it."""

    def __init__(self, loop: asyncio.AbstractEventLoop, test_id: str) -> None:
        self.loop = loop
        self.test_id = test_id
        self.tasks: list[asyncio.Task[Any]] = []
        self._previous = loop.get_task_factory()
        loop.set_task_factory(self._factory)  # type: ignore[arg-type]

    def _factory(self, loop: asyncio.AbstractEventLoop, coro: Any, **kwargs: Any) -> asyncio.Future[Any]:
        task = self._previous(loop, coro, **kwargs) if self._previous else asyncio.Task(coro, loop=loop, **kwargs)
        context = kwargs.get("context")
        # A task belongs to the test when it was started from the test's context (its body, its
        # function-scoped fixtures and everything they spawn). Tasks started from the context of a
        # module-scoped fixture (its server's connection handlers, its own loops) are the fixture's.
        owner = context.get(_CURRENT_TEST) if context is not None else _CURRENT_TEST.get()
        if owner == self.test_id and isinstance(task, asyncio.Task):
            self.tasks.append(task)
        return task

    def close(self) -> None:
        self.loop.set_task_factory(self._previous)


def _leaked_tasks(runner: asyncio.Runner, tracked: _TestTasks | None) -> list[str]:
    """Describe the test's tasks still pending after a few loop iterations, then cancel and await them."""
    loop = runner.get_loop()
    if loop.is_closed():
        return []

    async def settle() -> None:
        for _ in range(TASK_SETTLE_TICKS):
            await asyncio.sleep(0)

    runner.run(settle())
    # On a function-scoped loop (nothing tracked) every pending task is the test's.
    pending = list(asyncio.all_tasks(loop)) if tracked is None else [t for t in tracked.tasks if not t.done()]
    described = [repr(t) for t in pending]
    if pending:

        async def cancel() -> None:
            for task in pending:
                task.cancel()
            await asyncio.wait(pending, timeout=TASK_CANCEL_TIMEOUT_S)

        runner.run(cancel())
    return described


def _process_fds() -> set[int]:
    """Return the descriptors of _PROCESS_FILES among the modules imported so far."""
    fds: set[int] = set()
    for module, names in _PROCESS_FILES:
        for name in names:
            file = getattr(sys.modules.get(module), name, None)
            if file is not None and not file.closed:
                fds.add(file.fileno())
    return fds


def _leaked_fds(before: dict[int, str], runner: asyncio.Runner | None) -> dict[int, str]:
    """Return the descriptors opened since BEFORE that are still open after a grace period."""
    deadline = time.monotonic() + FD_GRACE_S
    collected = False
    while True:
        after = _open_fds() or {}
        ignored = _process_fds()
        leaked = {
            fd: target
            for fd, target in after.items()
            if before.get(fd) != target and fd not in ignored and not _PROCESS_PATHS.search(target)
        }
        if not leaked or time.monotonic() > deadline:
            return leaked
        if not collected:
            # An unreferenced socket or file closes here (and says so with a ResourceWarning).
            gc.collect()
            collected = True
        elif runner is not None and not runner.get_loop().is_closed():
            # A transport closes its socket on the loop iteration after close().
            runner.run(asyncio.sleep(FD_POLL_S))
        else:
            time.sleep(FD_POLL_S)


def _leaked_threads(before: set[int | None]) -> list[threading.Thread]:
    """Return the threads started since BEFORE that are still alive after a grace period."""
    deadline = time.monotonic() + THREAD_GRACE_S
    while True:
        leaked = [
            t for t in threading.enumerate() if t.ident not in before and t.is_alive() and not t.name.startswith(_POOL_THREAD_PREFIXES)
        ]
        if not leaked or time.monotonic() > deadline:
            return leaked
        time.sleep(0.05)


@pytest.fixture(autouse=True)
def verify_cleanup(request: pytest.FixtureRequest) -> Iterator[None]:
    """Fail a test that leaves tasks, threads or file descriptors behind it.

    Rules, checked in this order after the test and its function-scoped fixtures are torn down:

    - Tasks (async tests). On a function-scoped loop every task still pending is the test's. On a
      loop shared across a module (`loop_scope="module"`), a task is the test's when it was created
      during the test from the test's context: its body, its function-scoped fixtures, or a task
      or callback they started (a context variable set here marks them). Tasks that module-scoped
      fixtures started, before or during the test, are theirs and are checked when they stop.
      The loop first runs a few iterations so a cancellation requested without an await lands;
      what is still pending fails the test and is cancelled, so it cannot spill into the next one.
    - File descriptors: /proc/self/fd before and after (a number now pointing elsewhere counts
      as new). A descriptor opened before the test (the framework's capture files, module-scoped
      fixtures' loops, servers and databases) is never charged to it, nor one third-party code
      keeps for the life of the process (_PROCESS_FILES, _PROCESS_PATHS). Grace of FD_GRACE_S:
      one garbage collection (unreferenced sockets and files close, with a ResourceWarning that
      fails the test on its own), then the test's loop runs, since a transport closes its socket
      one iteration after close(). Skipped where /proc is absent.
    - Threads: started during the test and alive THREAD_GRACE_S later, except the loop's
      default executor workers, which pytest-asyncio stops with the loop.

    A test whose body already failed is not also charged with what its failure left behind.
    """
    runner, scope = _loop_runner(request) or (None, "")
    threads_before = {t.ident for t in threading.enumerate()}
    fds_before = _open_fds()
    token = _CURRENT_TEST.set(request.node.nodeid)
    tracked = _TestTasks(runner.get_loop(), request.node.nodeid) if runner is not None and scope != "function" else None
    try:
        yield
    finally:
        _CURRENT_TEST.reset(token)
        if tracked is not None:
            tracked.close()
    problems: list[str] = []
    if runner is not None:
        problems += [f"task leaked: {t}" for t in _leaked_tasks(runner, tracked)]
    if fds_before is not None:
        problems += [f"file descriptor leaked: {fd} -> {target}" for fd, target in sorted(_leaked_fds(fds_before, runner).items())]
    problems += [f"thread leaked: {t.name}" for t in _leaked_threads(threads_before)]
    if problems and not request.node.stash.get(_FAILED_CALL, False):
        pytest.fail("the test did not clean up:\n  " + "\n  ".join(problems), pytrace=False)


_OWN_FRAMES = frozenset({"_project_frames", "recording_init"})


def _project_frames(limit: int = 3) -> str:
    """Name the innermost mongarsd/ and tests/ frames of the current stack, innermost first."""
    found: list[str] = []
    for frame in reversed(traceback.extract_stack()):
        path = Path(frame.filename)
        if frame.name in _OWN_FRAMES or not path.is_relative_to(REPO) or path.parts[len(REPO.parts)] not in _SCANNED_PACKAGES:
            continue
        found.append(f"{path.relative_to(REPO)}:{frame.lineno} in {frame.name}")
        if len(found) == limit:
            break
    return " <- ".join(found) or "outside mongarsd/ and tests/"


@pytest.fixture(autouse=True)
def verify_no_blocking(request: pytest.FixtureRequest, verify_cleanup: None) -> Iterator[None]:
    """Fail an async test in which mongarsd or test code blocks the event loop (blockbuster).

    Blockbuster patches file, socket, sqlite, sleep and lock calls to raise BlockingError when one
    runs on a thread with a running loop and mongarsd/ or tests/ code is on the stack (third-party
    code is judged by who called it; a module's first import is exempt, see _IMPORT_FRAME).
    Every BlockingError is also recorded here, so one that a broad `except` swallowed still fails
    the test, and one behind a failure of another kind (a hang, a timeout) is listed next to it.
    Allow a call narrowly in _BLOCKING_ALLOWED, never by module. Sync tests run without it: their
    blocking calls block nothing. Depends on verify_cleanup so that it is off while those checks
    run the loop.
    """
    if not is_async_test(request.node):
        yield
        return
    calls: list[str] = []
    original_init = BlockingError.__init__

    def recording_init(self: BlockingError, func: str) -> None:
        original_init(self, func)
        calls.append(f"{func} at {_project_frames()}")

    BlockingError.__init__ = recording_init  # type: ignore[method-assign]
    try:
        with blockbuster_ctx(_SCANNED_PACKAGES) as bb:
            for function in bb.functions.values():
                function.can_block_in(*_IMPORT_FRAME)
            for name, filename, functions in _BLOCKING_ALLOWED:
                bb.functions[name].can_block_in(filename, functions)
            yield
    finally:
        BlockingError.__init__ = original_init  # type: ignore[method-assign]
    # Reported even when the test failed otherwise: a blocking call that a broad `except` swallowed
    # is often why it failed (a hang, a timeout).
    if calls and not request.node.stash.get(_FAILED_BLOCKING, False):
        pytest.fail("blocking calls in the event loop:\n  " + "\n  ".join(dict.fromkeys(calls)), pytrace=False)
