"""matchrt-xfeat: XFeat as a third-party matchrt plugin (entry point `xfeat` in group `matchrt`)."""

__version__ = "0.1.0"
