"""The platform edge: Ray Data / Ray Train / Tune adapters, MLflow, S3 storage.

Stages never import this package; it wraps them from the outside. Keep this init light (no Ray
import here) so `import qbert.platform.<module>` only pays for what that module needs.
"""
