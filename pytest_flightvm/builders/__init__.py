"""Built-in base image builders (the zero-config default image)."""
