"""Running graphs: CPU kernels per op, in-process materialisation, and the Dask plan executor."""
