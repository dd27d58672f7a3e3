"""Storage (local and S3), configuration, tracking and logging."""
