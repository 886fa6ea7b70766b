"""sepsnet eval."""
