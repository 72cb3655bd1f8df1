"""Placement: the pure scheduler, the roofline performance model, model presets."""
