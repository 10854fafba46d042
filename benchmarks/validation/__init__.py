"""Checks that a change of code changes no number: parity runs every digits config and compares two records."""
