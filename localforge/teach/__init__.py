"""The teach job: a teacher model improves answers and training data for a student (see README)."""
