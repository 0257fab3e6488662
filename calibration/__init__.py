"""gradad.calibration"""
