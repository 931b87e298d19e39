"""Shipped YAML configs (model presets in models/); a package only so installs carry them."""
