"""streamconv: out-of-core checkpoint conversion as a lazy graph over memory-mapped shards.

A conversion is compiled into a :class:`~streamconv.plan.Plan` (plain JSON) whose output tensors are
graphs of a small, closed op set (:mod:`streamconv.graph`).  An executor runs the plan on Dask, one
band of one tensor at a time, so memory stays bounded whatever the model size.
"""

__version__ = "0.1.0"
