"""Receive: the DICOM SCP that feeds the spool, and where its data sets arrive."""
