"""Built-in matcher plugins (registered through the `matchrt` entry-point group)."""
