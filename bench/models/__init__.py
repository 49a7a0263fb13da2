"""Built-in models; every module here is imported by the registry."""
