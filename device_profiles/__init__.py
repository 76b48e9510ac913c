"""Resource package, no code: the device profiles (TOML) shipped as `edge_tune.device_profiles` (see
edge_tune/resources.py)."""
