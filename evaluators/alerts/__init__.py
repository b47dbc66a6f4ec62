"""Alert rules (TOML) over data and eval metrics, and the hooks alerts are delivered to."""
