"""CheXprompt-style LLM judging: count a generated report's factual errors against the ground truth.

The published metric (GitHub microsoft/chexprompt) asks GPT-4 for six error types, each counted as
clinically significant and insignificant. When the ``chexprompt`` package is installed radtrt sends its
published prompt and reads answers with its published parser; otherwise radtrt's own prompt for the same
six types and answer format is used, and every result says so.
"""
