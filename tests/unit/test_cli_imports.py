"""What a mongarsd process imports: rich stays out even where a test dependency installs it."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys

import pytest

PROBE = """
import json, sys
from mongarsd.cli import main
code = main(["version"])
print(json.dumps({"code": code, "structlog": "structlog" in sys.modules, "rich": sys.modules.get("rich") is not None,
                  "pygments": "pygments" in sys.modules}))
"""


@pytest.mark.skipif(importlib.util.find_spec("rich") is None, reason="rich is not installed: nothing to keep out")
def test_the_cli_never_loads_rich_though_its_subcommands_import_structlog() -> None:
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=60, check=True)
    seen = json.loads(out.stdout.strip().splitlines()[-1])
    assert seen == {"code": 0, "structlog": True, "rich": False, "pygments": False}, out.stderr[-2000:]
