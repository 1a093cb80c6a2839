"""Configuration and real services: settings, embedded broker/Redis launcher, CLI."""
