"""Analyze stage: calibration rows (``calibration``) and per-head scores from running them through the
captured graph (``scores``)."""
