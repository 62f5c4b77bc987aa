"""Tools for testing split inference on one machine: an emulated link (``ShapedLink``), an
emulated slower device (``SlowDevice``, ``scaled_profile``), a device that only takes its time
(``PhantomDevice``, for load tests of the server) and a server launched as a
subprocess (``spawn_server``, ``stop_server``). Used by our tests and benchmarks, and meant for
apps that test themselves against a real server."""

from __future__ import annotations

from splitllm.testing.netem import LinkCounters, PhantomDevice, ShapedLink, SlowDevice, scaled_profile
from splitllm.testing.server import spawn as spawn_server
from splitllm.testing.server import stop as stop_server

__all__ = ["LinkCounters", "PhantomDevice", "ShapedLink", "SlowDevice", "scaled_profile", "spawn_server", "stop_server"]
