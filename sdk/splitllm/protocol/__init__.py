"""What crosses the network between a device and a server, shared by both sides: every WebSocket
message (``wire``), the typed /v1/plan request and answer (``plan``) and the Run payload
(``payload``). The client's end of a session (typed requests, pipelining, link measurement) is
``splitllm.transport``, which the server never imports."""
