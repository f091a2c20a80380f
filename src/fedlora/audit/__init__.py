"""Empirical privacy audits: canaries, their scores, and what the scores say about epsilon (`stats`)."""
