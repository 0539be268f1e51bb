The `postgresql` queue: several nodes share one queue with fenced leases, heartbeats and cluster-wide per-destination limits.
