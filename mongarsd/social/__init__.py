"""Social posting: an encrypted credentials vault and a Mastodon-compatible client behind a breaker.

vault.py     account tokens sealed with NaCl SecretBox under a random key file (0600)
mastodon.py  POST /api/v1/statuses with a bearer token and an idempotency key, bounded retries
service.py   SocialService: one circuit breaker per account, a journal of idempotency keys
cli.py       `mongarsd social add|list|remove|post` on the state dir
"""
