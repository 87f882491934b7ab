"""The judge stage: comparisons and judge requests, rubrics (``templates/``), parsing, agreement."""
