"""Benchmarks: peak training memory, step time against FLOP floors, accuracy comparisons, reports."""
