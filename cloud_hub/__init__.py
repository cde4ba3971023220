"""The fleet side of edgefleet: ingestion, fleet drift, rollouts, operator API (later issues)."""
