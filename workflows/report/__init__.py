"""Reports of past runs: `data` builds the report from the store, `html` and `csv` render it."""
