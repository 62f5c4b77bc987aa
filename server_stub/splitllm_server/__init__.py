"""splitllm-server: the aiohttp server that runs the server's segments and plans placements."""
