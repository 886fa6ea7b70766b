"""sepsnet export."""
