"""Slices -> probabilities -> patient decision by a named rule, with the evidence."""
