"""How runs become jobs: the command builder."""
