"""Experiment scripts (run as `python -m experiments.<name>`) and their input pipeline."""
