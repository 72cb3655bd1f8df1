"""Pure trust decisions: which jobs to spot-check, verdicts from evidence, reputation."""
