"""Model families, looked up lazily by `model.name` (importing this package registers nothing)."""
import importlib

# name -> module with a `get_train_spec()`; an explicit table instead of import-time registration.
_TRAIN_SPEC_MODULES = {
    "llama3": "torchtitan.models.llama3",
    "olmo": "torchtitan.models.olmo",
    "olmo2": "torchtitan.models.olmo2",
}


def model_names() -> list[str]:
    return list(_TRAIN_SPEC_MODULES)


def get_train_spec(name: str):
    if name not in _TRAIN_SPEC_MODULES:
        raise ValueError(f"model.name {name!r} is not one of {', '.join(_TRAIN_SPEC_MODULES)}")
    return importlib.import_module(_TRAIN_SPEC_MODULES[name]).get_train_spec()
