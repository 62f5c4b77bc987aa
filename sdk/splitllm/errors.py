"""The one exception tree of SplitLLM.

Every error the SDK, the exporter or the server raises on purpose is one of these. Foreign
errors (onnxruntime, aiohttp, msgpack, zstandard, OSError, ...) are caught at the edge and
re-raised as one of these with the original chained as ``__cause__``.

    SplitLLMError
    ├── ConfigError                 bad argument or option (also a ValueError)
    ├── BundleError                 a bundle cannot be used
    │   ├── BundleNotFound          no bundle at that path
    │   ├── BundleCorrupt           missing file, hash mismatch, unreadable manifest
    │   └── BundleVersionError      manifest format this SDK does not know
    ├── ExportError                 the exporter could not write a bundle
    │   ├── UnsupportedArchitecture model family we cannot split (names the supported ones)
    │   ├── ModelSourceError        missing or unreadable GGUF / checkpoint
    │   ├── NotEnoughDiskSpace      the output's filesystem cannot hold the bundle (checked first)
    │   └── ValidationFailed        a split's output differs from the reference
    ├── RuntimeFailure              ONNX Runtime failed while running a segment
    ├── CodecError                  a payload cannot be encoded or decoded
    │   └── UnknownCodec            codec name or id not known (lists the known ones)
    ├── ProtocolError               a wire frame is invalid
    │   ├── FrameError              malformed or oversized frame, bad field
    │   ├── VersionMismatch         protocol versions differ
    │   ├── BundleMismatch          client and server hold different bundles
    │   └── SessionStateError       a request does not fit the session's state (KV length, units)
    ├── ServerError                 talking to a server failed
    │   ├── ServerUnavailable       cannot reach the server (names the URL)
    │   ├── AuthError               missing or wrong token
    │   ├── LimitExceeded           a server limit was hit
    │   │   ├── FrameTooLarge       a frame over the server's max_frame_bytes
    │   │   ├── TooManySessions     the server holds its maximum of sessions
    │   │   ├── RateLimited         more steps per second than a connection may send
    │   │   └── TooManyTokens       more decode steps in a row than max_new_tokens
    │   └── RemoteError             the server answered with an error frame
    ├── GenerationError             a request cannot be generated
    │   ├── ContextTooLong          prompt + new tokens exceed the model's context
    │   └── InvalidToken            token id outside the vocabulary
    └── PlannerError                the planner cannot work on a problem
        └── InvalidProblem          a field of a problem is missing or out of range

Each class has a stable ``code`` string that the server puts in error frames, so the client
can rebuild the same exception on its side (see :func:`error_from_code`).
"""

from __future__ import annotations

__all__ = [
    "AuthError",
    "BundleCorrupt",
    "BundleError",
    "BundleMismatch",
    "BundleNotFound",
    "BundleVersionError",
    "CodecError",
    "ConfigError",
    "ContextTooLong",
    "ExportError",
    "FrameError",
    "FrameTooLarge",
    "GenerationError",
    "InvalidProblem",
    "InvalidToken",
    "LimitExceeded",
    "ModelSourceError",
    "NotEnoughDiskSpace",
    "PlannerError",
    "ProtocolError",
    "RateLimited",
    "RemoteError",
    "RuntimeFailure",
    "ServerError",
    "ServerUnavailable",
    "SessionStateError",
    "SplitLLMError",
    "TooManySessions",
    "TooManyTokens",
    "UnknownCodec",
    "UnsupportedArchitecture",
    "ValidationFailed",
    "VersionMismatch",
    "error_from_code",
]


class SplitLLMError(Exception):
    """Base of every SplitLLM error."""

    code: str = "internal"


class ConfigError(SplitLLMError, ValueError):
    code = "bad_config"


class BundleError(SplitLLMError):
    code = "bundle"


class BundleNotFound(BundleError, FileNotFoundError):
    code = "bundle_not_found"


class BundleCorrupt(BundleError):
    code = "bundle_corrupt"


class BundleVersionError(BundleError):
    code = "bundle_version"


class ExportError(SplitLLMError):
    code = "export"


class UnsupportedArchitecture(ExportError):
    code = "unsupported_architecture"


class ModelSourceError(ExportError):
    code = "model_source"


class NotEnoughDiskSpace(ExportError):
    code = "not_enough_disk_space"


class ValidationFailed(ExportError):
    code = "validation_failed"


class RuntimeFailure(SplitLLMError):
    code = "runtime"


class CodecError(SplitLLMError):
    code = "codec"


class UnknownCodec(CodecError, ValueError):
    code = "unknown_codec"


class ProtocolError(SplitLLMError):
    code = "protocol"


class FrameError(ProtocolError):
    code = "bad_frame"


class VersionMismatch(ProtocolError):
    code = "version_mismatch"


class BundleMismatch(ProtocolError):
    code = "bundle_mismatch"


class SessionStateError(ProtocolError):
    code = "session_state"


class ServerError(SplitLLMError):
    code = "server"


class ServerUnavailable(ServerError, ConnectionError):
    code = "server_unavailable"


class AuthError(ServerError):
    code = "unauthorized"


class LimitExceeded(ServerError):
    code = "limit_exceeded"


class FrameTooLarge(LimitExceeded):
    code = "frame_too_large"


class TooManySessions(LimitExceeded):
    code = "too_many_sessions"


class RateLimited(LimitExceeded):
    code = "rate_limited"


class TooManyTokens(LimitExceeded):
    code = "too_many_tokens"


class RemoteError(ServerError):
    """The server answered with an error frame whose code has no closer class here."""

    code = "remote"


class GenerationError(SplitLLMError):
    code = "generation"


class ContextTooLong(GenerationError):
    code = "context_too_long"


class InvalidToken(GenerationError, ValueError):
    code = "invalid_token"


class PlannerError(SplitLLMError):
    code = "planner"


class InvalidProblem(PlannerError, ValueError):
    code = "invalid_problem"


def _all_error_classes() -> list[type[SplitLLMError]]:
    out: list[type[SplitLLMError]] = []
    stack: list[type[SplitLLMError]] = [SplitLLMError]
    while stack:
        cls = stack.pop()
        out.append(cls)
        stack.extend(cls.__subclasses__())
    return out


def error_from_code(code: str, message: str) -> SplitLLMError:
    """Rebuild the exception a remote side reported as ``(code, message)``.

    Codes this version does not know become :class:`RemoteError` carrying the code in the text.
    """
    for cls in _all_error_classes():
        if cls.code == code:
            return cls(message)
    err = RemoteError(f"{code}: {message}")
    err.code = code
    return err
