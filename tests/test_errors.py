import splitllm
from splitllm import errors


def test_every_error_derives_from_the_root():
    for name in errors.__all__:
        obj = getattr(errors, name)
        if isinstance(obj, type):
            assert issubclass(obj, errors.SplitLLMError), name


def test_codes_are_unique():
    codes = [cls.code for cls in errors._all_error_classes()]
    assert len(codes) == len(set(codes))


def test_error_from_code_round_trips_known_and_unknown_codes():
    err = errors.error_from_code("bundle_mismatch", "different bundles")
    assert isinstance(err, errors.BundleMismatch)
    assert str(err) == "different bundles"
    unknown = errors.error_from_code("from_the_future", "hm")
    assert isinstance(unknown, errors.RemoteError)
    assert unknown.code == "from_the_future"
    assert "from_the_future" in str(unknown)


def test_root_is_exported():
    assert splitllm.SplitLLMError is errors.SplitLLMError


def test_public_surface_is_pinned():
    assert sorted(splitllm.__all__) == sorted([
        "Bundle", "ChatSession", "GenerationStats", "Placement", "Plan", "Policy", "Problem", "Profile",
        "RuntimeOptions", "SamplingParams", "SplitClient", "SplitLLMError", "TokenPiece", "__version__",
        "codec_names", "decode", "encode", "errors", "get_codec", "load_or_measure", "make_policy", "run_chat",
        "solve",
    ])
    for name in splitllm.__all__:
        assert hasattr(splitllm, name), name


def test_testing_surface_is_pinned_and_resolves():
    import splitllm.testing

    assert sorted(splitllm.testing.__all__) == sorted([
        "LinkCounters", "PhantomDevice", "ShapedLink", "SlowDevice", "scaled_profile", "spawn_server", "stop_server",
    ])
    for name in splitllm.testing.__all__:
        assert hasattr(splitllm.testing, name), name
    assert callable(splitllm.testing.spawn_server) and callable(splitllm.testing.stop_server)


def test_every_sdk_module_all_names_resolve():
    """A name listed in any ``__all__`` of the SDK exists (a move that forgets a re-export fails here)."""
    import importlib
    import pkgutil

    checked = 0
    for info in pkgutil.walk_packages(splitllm.__path__, "splitllm."):
        if info.name.rsplit(".", 1)[-1] == "__main__":
            continue  # runs a command when imported
        module = importlib.import_module(info.name)
        missing = [name for name in getattr(module, "__all__", ()) if not hasattr(module, name)]
        assert missing == [], f"{info.name}.__all__ names what it does not define: {missing}"
        checked += hasattr(module, "__all__")
    assert checked >= 10


def test_sdk_import_does_not_pull_heavy_libraries():
    import subprocess
    import sys

    code = ("import sys, splitllm, splitllm_gateway.cli, splitllm.cli\n"
            "print([m for m in ('torch', 'transformers', 'onnx', 'optimum', 'scipy') if m in sys.modules])")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]"
