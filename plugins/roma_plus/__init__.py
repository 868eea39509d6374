"""MatchAnything RoMa (roma_plus) plugin."""
