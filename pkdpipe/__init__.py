"""pkdpipe: Patient Knowledge Distillation for BERT-style models.

Run the teacher once (`cache_teacher`), then distill as many students as you like from the cache
(`distill`), with no teacher forward pass in the loop. Every CLI command is also a function here:

    from pkdpipe import CacheConfig, cache_teacher
    result = cache_teacher(CacheConfig(task="sst2", data_dir="data/sst2", teacher="runs/sst2/teacher"))

Imports are lazy so that `import pkdpipe` stays cheap (no torch until a stage runs).
"""

from importlib import import_module

__version__ = "0.2.0"

_EXPORTS = {
    "CacheConfig": "pkdpipe.config",
    "DistillConfig": "pkdpipe.config",
    "FinetuneConfig": "pkdpipe.config",
    "EvaluateConfig": "pkdpipe.config",
    "cache_teacher": "pkdpipe.teacher",
    "open_cache": "pkdpipe.cache.reader",
    "verify_cache": "pkdpipe.cache.verify",
    "finetune": "pkdpipe.train",
    "distill": "pkdpipe.train",
    "evaluate": "pkdpipe.evaluate",
    "predict": "pkdpipe.evaluate",
    "PkdError": "pkdpipe.errors",
    "DemoConfig": "pkdpipe.demo",
    "run_demo": "pkdpipe.demo",
}

__all__ = [*sorted(_EXPORTS), "__version__"]


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'pkdpipe' has no attribute {name!r}")
