"""
`nanochat-import`: bring a published nanochat checkpoint (Hugging Face hub, a directory, an S3 prefix) into the
artifact store, verify it, evaluate it and promote it like a trained one. Dagster-free; the `imported_checkpoint`
asset (orchestration/defs/imports.py) wraps it. `python -m importer.demo DIR` publishes and promotes two tiny
freshly trained chat models instead, to try the app without the pipeline.
"""
