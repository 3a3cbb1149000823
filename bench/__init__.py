"""`make bench`: measured figures, written to bench/results.json."""
