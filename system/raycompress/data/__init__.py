"""Corpus readers and tokenization, written as batch -> batch functions for Ray Data."""
