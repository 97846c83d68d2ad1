"""Storage by location (local path or URI, `uri`) and the node-local cache of remote files (`cache`)."""
