"""Evaluation of synthetic LGE data through three gates: realism, alignment and utility (DOMAIN.md section 5)."""
