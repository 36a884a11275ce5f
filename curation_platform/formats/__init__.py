"""Readers and writers for on-disk dataset formats."""
