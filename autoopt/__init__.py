"""autoopt: profile a PyTorch model, diagnose it, apply verified transforms, report the gain."""
__version__ = "0.1.0"
