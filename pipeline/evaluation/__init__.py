"""Metrics with patient-level intervals and paired comparisons; Grad-CAM."""
