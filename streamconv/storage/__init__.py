"""Readers and writers, format by format: ``base.TensorFormat`` is the protocol, ``registry`` maps plan format
names to format objects.  Nothing here knows about any model."""
