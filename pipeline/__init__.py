"""Reproducible experiment pipeline for lightweight medical-image classifiers.

One module per DVC stage (``fetch_data``, ``extract_frames``, ``split_folds``, ``train``,
``evaluate``, ``export``, ``report``) plus a few shared modules (``config``, ``models``,
``losses``, ``metrics``, ``tracking``).
"""
