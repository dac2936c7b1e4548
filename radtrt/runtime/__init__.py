"""Inference: backends behind one small interface, and the study -> report pipeline."""
