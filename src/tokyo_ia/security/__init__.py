"""Authentication of callers, and (later) API keys, secrets and the audit trail."""
