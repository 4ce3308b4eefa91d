"""Mutation testing: ``catalogue.py`` holds the deliberate bugs, grouped by the file they break;
``runner.py`` applies each to a copy of the tree and runs the suites: ``python -m verification.mutations``.
"""
