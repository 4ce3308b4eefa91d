"""The gate: the fast model as a run executes it, checked against the float64 reference of its own
weights by the precision rule (`crate verify`, and every `crate train` before its first step).

rule.py states the rule, plain.py and plain_alpha.py are the plain implementations it compares with,
families.py builds each family's three implementations, layers.py runs them layer by layer, gate.py
checks a whole model on both of its paths and reports, command.py is `crate verify`."""

from .gate import EXIT_FAILED, Report, Row, check_model

__all__ = ["EXIT_FAILED", "Report", "Row", "check_model"]
