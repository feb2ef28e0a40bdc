"""Authentication: argon2id passwords, bearer tokens, login throttling."""
