"""Choosing deployments: the catalog of public models and (later) strategies and rules."""
