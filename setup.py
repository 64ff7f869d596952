"""Packaging for mongarsd."""

from pathlib import Path

from setuptools import find_packages, setup

ROOT = Path(__file__).parent
VERSION = next(
    line.split('"')[1] for line in (ROOT / "mongarsd" / "__init__.py").read_text().splitlines() if line.startswith("__version__")
)

setup(
    name="mongarsd",
    version=VERSION,
    description="Private AI daemon for small boards: local LLM, memory, encrypted LAN mesh",
    long_description=(ROOT / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    license="MIT",
    python_requires=">=3.11",
    packages=find_packages(include=["mongarsd", "mongarsd.*"]),
    data_files=[
        ("share/mongarsd/configs/boards", [str(p.relative_to(ROOT)) for p in sorted((ROOT / "configs" / "boards").glob("*.toml"))]),
        ("share/mongarsd/systemd", [str(p.relative_to(ROOT)) for p in sorted((ROOT / "systemd").glob("*")) if p.suffix in (".service", ".conf")]),
    ],
    install_requires=[
        # native/ builds llama.cpp's tools from exactly this version's vendored source
        "llama-cpp-python==0.3.36",
        "onnxruntime>=1.18",
        "onnx>=1.16",
        "tokenizers>=0.19",
        "safetensors>=0.4",
        "numpy>=1.26",
        "jinja2>=3.1",  # chat templates rendered in a sandbox
        "aiosqlite>=0.20",
        "aiohttp>=3.11",
        "psutil>=5.9",
        "pynacl>=1.5",
        "zeroconf>=0.132",
        "msgpack>=1.0",
        "structlog>=24.1",
        "prometheus-client>=0.20",
        "trafilatura>=2.0",  # Iris: main text of fetched HTML pages (pure Python over lxml)
        "pypdf>=4.0",  # Iris: text of PDF documents (pure Python)
        "lxml-html-clean>=0.1",  # lxml.html.clean moved there; justext (under trafilatura) imports it
    ],
    extras_require={
        "test": [
            "pytest>=8",
            "pytest-asyncio>=1.1",  # tests/conftest.py's cleanup checks use its per-scope Runner fixtures
            "blockbuster>=1.5.29,<1.6",  # new rules arrive in minor versions only
            "pytest-timeout>=2.3",
            "hypothesis>=6.100",
            "openai>=1.40",
            "ollama>=0.3",
            # tests/integration/test_openapi.py: property-based runs against /openapi.json, and its validation
            "schemathesis>=4.32.5,<4.33",
            "openapi-spec-validator>=0.9,<0.10",
            # tests/integration/test_client_replay.py, test_sdk_clients.py: tool arguments against their JSON Schema
            "jsonschema>=4.18",
            # tests/integration/test_sdk_clients.py: LangChain's Ollama and OpenAI chat models with bound tools
            "langchain-ollama>=1.0,<2",
            "langchain-openai>=1.0,<2",
        ],
        "dev": ["ruff>=0.6", "mypy>=1.11"],
        "bench": ["matplotlib>=3.8"],
    },
    entry_points={"console_scripts": ["mongarsd=mongarsd.cli:main"]},
    classifiers=[
        "Programming Language :: Python :: 3",
        "Operating System :: POSIX :: Linux",
        "Framework :: AsyncIO",
    ],
)
