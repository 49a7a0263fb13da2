"""Built-in methods: one module per method, each registered by decorator; all are imported by the registry."""
