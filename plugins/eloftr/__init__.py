"""MatchAnything EfficientLoFTR matcher plugin (`eloftr`)."""
