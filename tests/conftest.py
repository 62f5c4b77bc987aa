"""Shared fixtures: real bundles exported once per test session.

Tiny random-weight models export in about a second each. The built-in SmolLM2 export (about a
minute) is cached under .cache/test-bundles, keyed by a hash of the exporter and runtime sources,
so a local re-run reuses it and any change to the code that writes or reads bundles re-exports.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CACHE = REPO / ".cache" / "test-bundles"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _code_key() -> str:
    h = hashlib.sha256()
    files = sorted((REPO / "exporter" / "splitllm_export").glob("*.py"))
    files += [REPO / "sdk" / "splitllm" / "model" / n for n in ("graphs.py", "bundle.py", "runtime.py", "text.py")]
    for f in files:
        h.update(f.name.encode())
        h.update(f.read_bytes())
    return h.hexdigest()[:12]


@pytest.fixture(scope="session")
def tiny_export(tmp_path_factory):
    """Export (once per session) a tiny model; returns (bundle path, Source)."""
    from splitllm_export.export import export_bundle
    from splitllm_export.sources import load_tiny

    made: dict[tuple[str, int, int], tuple[Path, object]] = {}

    def get(family: str, layers: int = 3, seed: int = 0):
        key = (family, layers, seed)
        if key not in made:
            source = load_tiny(family, num_layers=layers, seed=seed)
            out = tmp_path_factory.mktemp(f"tiny-{family}") / "bundle"
            export_bundle(source, out, show_progress=False)
            made[key] = (out, source)
        return made[key]

    return get


@pytest.fixture(scope="session")
def smollm2_source():
    from splitllm_export.sources import BUILTIN, builtin_gguf, load_gguf

    return load_gguf(builtin_gguf("smollm2"), model_id=BUILTIN["smollm2"][2])


@pytest.fixture(scope="session")
def smollm2_bundle(smollm2_source) -> Path:
    """The built-in model exported with validation at every split (cached across local runs)."""
    from splitllm.model.bundle import MANIFEST
    from splitllm_export.export import export_bundle

    path = CACHE / f"smollm2-{_code_key()}"
    if not (path / MANIFEST).is_file():
        if CACHE.exists():
            for old in CACHE.glob("smollm2-*"):
                shutil.rmtree(old, ignore_errors=True)
        export_bundle(smollm2_source, path, force=True, show_progress=False)
    return path


class RunningServer:
    """A real splitllm-server app on an ephemeral loopback port, in the test's event loop."""

    def __init__(self, runner, url: str, app) -> None:
        self.runner = runner
        self.url = url
        self.app = app

    @property
    def state(self):
        from splitllm_server.app import STATE

        return self.app[STATE]

    async def stop(self) -> None:
        await self.runner.cleanup()


@pytest.fixture
async def start_server():
    """Factory: ``await start_server(bundle_path, **config)`` -> RunningServer (stopped after the test)."""
    from aiohttp import web

    from splitllm_server.app import create_app
    from splitllm_server.config import ServerConfig

    running: list[RunningServer] = []

    async def start(bundle: Path, **overrides) -> RunningServer:
        overrides.setdefault("allow_spinning", False)
        overrides.setdefault("verify_bundle", False)
        config = ServerConfig(bundle=Path(bundle), host="127.0.0.1", port=0, **overrides)
        app = create_app(config)
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]
        server = RunningServer(runner, f"http://127.0.0.1:{port}", app)
        running.append(server)
        return server

    yield start
    for server in running:
        await server.stop()
