"""Chain backends: the service's only view of the blockchain."""
