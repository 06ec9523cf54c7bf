"""Readers and writers, format by format.  Nothing here knows about any model."""
