"""Class-incremental methods, one per file: a task at a time."""
