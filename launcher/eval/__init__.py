"""Evaluation: perplexity, BLEU and ROUGE on held-out data (metrics.py), and `ftl eval` as a job
of its own (job.py)."""
