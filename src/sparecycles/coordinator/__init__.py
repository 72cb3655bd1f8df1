"""The coordinator process minus HTTP: admission, dispatch, node connections, verification."""
