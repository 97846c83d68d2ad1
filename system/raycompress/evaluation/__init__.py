"""Evaluation: YAML task files, log-likelihood and perplexity scoring, metrics with standard errors.

Importing the package registers the readers, text filters, metrics and task kinds by name.
"""
from raycompress.evaluation import formats, metrics, tasks  # noqa: F401  (fill the registries)
