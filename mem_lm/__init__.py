"""mem_lm package."""
