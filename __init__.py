"""covtoken."""
