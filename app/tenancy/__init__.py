"""API keys: authentication, per-key limits and fair scheduling between keys."""
