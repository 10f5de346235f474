"""Storage of the information service behind one interface (see base.py)."""
