"""The Label Studio ML backend: Label Studio JSON ⇄ seemly types, sessions, webhooks (docs/backend.md)."""
