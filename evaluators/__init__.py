"""Scoring a model that is already in memory."""
