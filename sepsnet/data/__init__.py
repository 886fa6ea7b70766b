"""sepsnet data."""
