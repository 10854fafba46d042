"""Generators of the tables and plots published in docs/: every method on digits (compare_methods, writes
docs/results.md), DynaMMo's merge strategies against ACL (dynammo_merging), the inference cost of the dynamic
methods as tasks accumulate (dynamic_cost)."""
