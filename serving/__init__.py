"""Reads model state, builds feeds (candidates → rank → re-rank), serves them over HTTP."""
