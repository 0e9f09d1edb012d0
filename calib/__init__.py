"""Calibration data sets drawn from a catalog and calibrators (`sdk.calib`)."""
