"""The five measurements of issue 7, one module each, and how they report."""
