"""Training loops (Lightning modules), reproducible loading and run directories."""
