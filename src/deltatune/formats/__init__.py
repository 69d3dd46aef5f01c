"""On-disk formats: PEFT's adapter folders, and (in later modules) loading base models."""
