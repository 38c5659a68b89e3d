"""Workaround for transformers 4.40.x + safetensors files saved without metadata.

The chathub fixtures' *.safetensors carry no `__metadata__` (no {"format": "pt"}); transformers 4.40.2
calls `safe_open(...).metadata().get("format")` and crashes with AttributeError on None.
Importing this module makes transformers.modeling_utils see {"format": "pt"} for such files.
Numerics are untouched (only the metadata query is wrapped)."""
import safetensors
import transformers.modeling_utils as _mu

_orig_safe_open = safetensors.safe_open


class _Wrapped:
    def __init__(self, inner):
        self._inner = inner

    def __enter__(self):
        self._f = self._inner.__enter__()
        return self

    def __exit__(self, *exc):
        return self._inner.__exit__(*exc)

    def metadata(self):
        md = self._f.metadata()
        return md if md is not None else {"format": "pt"}

    def __getattr__(self, name):
        return getattr(self._f, name)


def _safe_open(*args, **kwargs):
    return _Wrapped(_orig_safe_open(*args, **kwargs))


_mu.safe_open = _safe_open
