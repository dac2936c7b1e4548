"""Benchmarks: ``radtrt bench latency`` and ``radtrt bench parity``, with JSON, Markdown and PNG reports.

Benchmarks print ratios measured in one run, on one machine, with the command that reproduces them;
nothing here asserts a time.
"""
