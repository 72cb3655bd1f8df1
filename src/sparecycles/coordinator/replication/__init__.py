"""Several coordinator replicas: the bus between them, the fleet of each other's nodes, leases."""
