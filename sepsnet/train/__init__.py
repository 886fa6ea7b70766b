"""sepsnet train."""
