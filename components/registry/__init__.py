"""Model registry and promotion gates."""
from components.registry.promotion import (Decision, current_promoted, decide, dvc_out_hash, file_sha256,
                                           git_revision, load_registry, register_candidate)

__all__ = ["Decision", "current_promoted", "decide", "dvc_out_hash", "file_sha256", "git_revision", "load_registry",
           "register_candidate"]
