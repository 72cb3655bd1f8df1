"""Inference backends behind one interface (``base.Engine``)."""
