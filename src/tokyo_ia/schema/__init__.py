"""Wire types of the canonical (OpenAI) format and the checks of the fields we read."""
