"""splitllm-gateway: an OpenAI-compatible HTTP API in front of a split server.

A client application of the SDK: it runs the device side of the split through
:class:`splitllm.SplitClient` and imports only the public ``splitllm`` API (the names in
``splitllm.__all__`` and ``splitllm.errors``), never ``splitllm_server``; it ships with the
``server`` extra because it needs ``prometheus_client``. ``app`` is the HTTP side, ``api`` the
OpenAI request and reply shapes, ``clients`` the pool of SplitClients, ``cli`` the command.
Usage: docs/gateway.md.
"""

from splitllm_gateway.app import create_gateway_app, serve_gateway

__all__ = ["create_gateway_app", "serve_gateway"]
