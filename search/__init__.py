"""The optimizer: study config, search space, study loop, Ray workers, records, reports, CLI."""
