"""Teleradiology edge appliance: receive DICOM, spool it encrypted and durable, forward it."""

__version__ = "0.1.0"
