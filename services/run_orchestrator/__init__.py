"""Drives runs through their states and calls the model."""
