"""What crosses the network between a device and a server: every WebSocket message (``wire``),
the typed /v1/plan request and answer (``plan``), and the client's end of a session
(``connection``: typed requests, pipelining, link measurement). Both sides import ``wire`` and
``plan``; the server never imports ``connection``."""
