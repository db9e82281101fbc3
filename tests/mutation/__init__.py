"""`make mutate`: mutation testing of the durable core with cosmic-ray (see `__main__`)."""
