"""The base model and its LoRA adapter: loading (embedded or a local folder), devices,
fingerprints and the saved-model store."""
