"""Built-in tasks: one module per task, each registered by decorator; all are imported by the registry."""
