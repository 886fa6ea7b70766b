"""sepsnet engines."""
