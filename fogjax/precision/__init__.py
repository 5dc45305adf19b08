"""Number formats, delayed scaling and precision recipes."""
