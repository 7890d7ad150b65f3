"""Fuzzing harness for the sans-IO core: atheris target (fuzz_core.py), reference checks
(sipcheck.py), seeds and the regression test that replays them under pytest."""
