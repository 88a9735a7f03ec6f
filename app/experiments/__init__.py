"""A/B experiments: their live state (`state`), who gets which variant (`assignment`), the
copies sent to shadow variants (`shadow`), and how each variant did (`report`)."""
