"""The worklist: database, priority policy and change events."""
