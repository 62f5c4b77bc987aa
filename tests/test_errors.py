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
