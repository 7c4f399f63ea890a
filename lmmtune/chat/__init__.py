"""`python -m lmmtune chat`: try a model in the browser, base and adapted side by side."""
