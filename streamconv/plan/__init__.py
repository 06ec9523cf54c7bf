"""Plans: what a conversion reads and writes, as data; and the planner that compiles them."""

from .plan import SCHEMA_VERSION, Dropped, OutputFile, OutputTensor, Plan, SourceFile

__all__ = ["SCHEMA_VERSION", "Plan", "SourceFile", "OutputFile", "OutputTensor", "Dropped"]
