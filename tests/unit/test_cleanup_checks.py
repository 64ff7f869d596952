"""The cleanup checks of tests/conftest.py catch what they promise, and nothing more, in a pytest of their own."""

from __future__ import annotations

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

CONFTEST = """
import tests.conftest as checks

pytest_plugins = ["tests.conftest"]
checks.THREAD_GRACE_S = 0.2
checks.FD_GRACE_S = 1.0
checks._SCANNED_PACKAGES.append("test_inner")  # judge this file like the project's tests
"""

INNER = """
import asyncio
import os
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio

from tests.conftest import requires_models

HELD = []


async def test_task_leak():
    HELD.append(asyncio.get_running_loop().create_task(asyncio.sleep(60), name="leaky-task"))


async def test_cancel_without_await_is_fine():
    task = asyncio.create_task(asyncio.sleep(60))
    await asyncio.sleep(0)
    task.cancel()


def test_fd_leak():
    HELD.append(os.open(os.devnull, os.O_RDONLY))


def test_thread_leak():
    stop = threading.Event()
    HELD.append(stop)
    threading.Thread(target=stop.wait, args=(5,), name="leaky-thread", daemon=True).start()


async def test_blocking_call():
    time.sleep(0.001)


async def test_swallowed_blocking_call():
    try:
        time.sleep(0.001)
    except Exception:
        pass


def test_sync_tests_may_block():
    time.sleep(0.001)


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def server() -> AsyncIterator[int]:
    async def handle(reader, writer):
        await reader.read()
        await asyncio.sleep(0.1)  # still running after the test: the server's task, not the test's
        writer.close()

    srv = await asyncio.start_server(handle, "127.0.0.1", 0)
    background = asyncio.create_task(asyncio.sleep(3600), name="fixture-task")
    yield srv.sockets[0].getsockname()[1]
    background.cancel()
    srv.close()
    await srv.wait_closed()


@pytest.mark.asyncio(loop_scope="module")
async def test_module_fixture_tasks_are_its_own(server):
    _, writer = await asyncio.open_connection("127.0.0.1", server)
    writer.write(b"x")
    writer.close()
    await writer.wait_closed()


@pytest.mark.asyncio(loop_scope="module")
async def test_module_loop_task_leak(server):
    HELD.append(asyncio.create_task(asyncio.sleep(60), name="leaky-module-task"))


@requires_models(Path("/nonexistent/model.gguf"))
def test_needs_models():
    pass
"""


@pytest.fixture
def inner(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> pytest.Pytester:
    monkeypatch.setenv("PYTHONPATH", str(REPO))
    monkeypatch.delenv("CI", raising=False)
    pytester.makeini("[pytest]\nasyncio_mode = auto\nasyncio_default_fixture_loop_scope = function\n")
    pytester.makeconftest(CONFTEST)
    pytester.makepyfile(test_inner=INNER)
    return pytester


def test_checks_fail_leaks_and_blocking_only(inner: pytest.Pytester) -> None:
    result = inner.runpytest_subprocess("-p", "no:cacheprovider", "-rA")
    result.assert_outcomes(passed=8, failed=1, errors=5, skipped=1)
    result.stdout.fnmatch_lines_random(
        [
            "*ERROR at teardown of test_task_leak*",
            "*task leaked: <Task pending name='leaky-task'*",
            "*file descriptor leaked: * -> /dev/null*",
            "*thread leaked: leaky-thread*",
            "*BlockingError: Blocking call to time.sleep",
            "FAILED test_inner.py::test_blocking_call - *",
            "*ERROR at teardown of test_swallowed_blocking_call*",
            "*time.sleep at *",
            "*task leaked: <Task pending name='leaky-module-task'*",
            "PASSED test_inner.py::test_cancel_without_await_is_fine",
            "PASSED test_inner.py::test_sync_tests_may_block",
            "PASSED test_inner.py::test_module_fixture_tasks_are_its_own",
            "SKIPPED * default models not installed: /nonexistent/model.gguf*",
        ]
    )
    assert "fixture-task" not in result.stdout.str()


def test_missing_models_fail_under_ci(inner: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CI", "true")
    result = inner.runpytest_subprocess("-p", "no:cacheprovider", "-k", "needs_models")
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(["*default models not installed: /nonexistent/model.gguf*under CI the model tests must run*"])
