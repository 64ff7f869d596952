"""Iris: the polite fetcher and ingester (allowlisted sources, robots.txt, rate limits, text extraction)."""
