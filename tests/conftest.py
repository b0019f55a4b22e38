"""Shared fixtures: zoo checkpoints are built once per session into a temp dir."""
