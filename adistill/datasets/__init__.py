"""Data shipped inside the package."""
