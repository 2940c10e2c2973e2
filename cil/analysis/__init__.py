"""Analysis: tables and plots read from run folders (never imports the runner)."""
