"""Runtime backends, registered as plugins of the same host as the matchers."""
