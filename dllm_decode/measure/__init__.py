"""Measuring decoders: held-out tasks, scoring, side-by-side benchmarks and step traces."""
