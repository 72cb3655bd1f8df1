"""The node agent: runs on an owner's device, dials out to the coordinator, serves jobs."""
