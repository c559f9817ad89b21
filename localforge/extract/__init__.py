"""Documents -> chunks -> schema-checked, grounded JSONL records (``localforge extract``)."""
