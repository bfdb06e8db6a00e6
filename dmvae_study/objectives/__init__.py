"""Objectives: small callables kept apart from networks and samplers (EDM `loss.py` style)."""
