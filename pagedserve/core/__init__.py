"""What runs: requests, the paged KV block pool, the scheduler. Pure Python: no torch here."""
