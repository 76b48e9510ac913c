"""Resource package, no code: the built-in tasks (SST-2, CR, SUBJ, MPQA; see README.md here) shipped as
`edge_tune.tasks` (see edge_tune/resources.py)."""
