"""Evaluation: task readers (registered by format), log-likelihood / perplexity scoring, metrics."""
from raycompress.evaluation import formats  # noqa: F401  (register the readers)
