"""Jobs stage: what runs on a schedule against the lake and the registry (retraining, monitoring)."""
