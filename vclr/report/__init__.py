"""Report stage: the paper tables (pandas) and figures (matplotlib) of one profile."""
