"""Ray shells only: the select pipeline on Ray Data, compression actors, the eval pool, the orchestrator."""
