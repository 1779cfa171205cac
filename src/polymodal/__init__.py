"""polymodal: multimodal pretraining over one model of several modality encoders.

`polymodal.load(checkpoint)` returns a trained model (see `polymodal.api`); it is imported
on first use so that `import polymodal.data...` stays light.
"""


def __getattr__(name: str):
    if name == "load":
        from polymodal.api import load

        return load
    raise AttributeError(f"module 'polymodal' has no attribute {name!r}")
