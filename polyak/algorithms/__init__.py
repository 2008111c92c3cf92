"""One module per optimizer: its docstring, class, checks and update rule."""
