"""From raw files to audited folds: dataset adapters, frame decoding, duplicate linking, loading."""
