"""MatchAnything RoMa (roma_full) plugin."""
