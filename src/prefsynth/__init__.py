"""prefsynth: prompts in; responses, judge ratings, chosen/rejected pairs and a card out."""

__version__ = "0.1.0"
