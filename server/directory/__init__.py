"""Directory and identity: users, the department tree, workgroups."""
