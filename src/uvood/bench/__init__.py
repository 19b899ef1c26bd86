"""Benchmarks as data: specs (``specs/*.json``) -> runner -> result rows -> tables, figures, report."""
