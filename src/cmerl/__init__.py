"""cmerl."""
