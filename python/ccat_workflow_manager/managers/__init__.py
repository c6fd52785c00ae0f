"""The managers' one-cycle entry points, as the data center's Python code calls them."""
