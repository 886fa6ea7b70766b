"""sepsnet cli."""
