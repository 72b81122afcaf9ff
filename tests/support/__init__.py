"""Test helpers shared by several test files (archive writers, a local HTTP server)."""
