"""Artifact storage backends behind one interface (see base.py)."""
