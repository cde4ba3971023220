"""edgefleet command-line entry point: one `edgefleet` command, groups loaded lazily per package."""
