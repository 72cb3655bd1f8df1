"""The coordinator's HTTP and WebSocket surface. Validates at the boundary, then calls the core."""
