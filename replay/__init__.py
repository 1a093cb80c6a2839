"""Offline side: log loaders and (later) prequential replay with the live model code."""
