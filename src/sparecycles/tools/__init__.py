"""Tools that are never a backend: the demo, a local network, test models, the load test."""
