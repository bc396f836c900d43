"""Errors that reach users: each carries a one-line message that names the next thing to try.

Messages speak of the library's own parameters, written in braces: ``ParameterError("{ga_w} 9000 must be
smaller than ...")``. ``str(error)`` shows them as parameter names (``ga_w 9000 must be ...``); a front end
shows them in its own words with :meth:`SelfextError.render` (the command line: ``--ga-w 9000 must be ...``).
So the library never speaks in command-line flags, and each front end names things once.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

# the parameters messages may name, and how the library itself spells them
PARAMETERS = {
    "ga_n": "ga_n", "ga_w": "ga_w", "ga_keys": "ga_keys", "auto": "auto", "n_ctx": "n_ctx", "n_batch": "n_batch",
    "chat": "chat=True", "no_chat": "chat=False", "system": "system", "text": "text", "lengths": "lengths",
    "window": "window", "n_prompt": "n_prompt", "n_gen": "n_gen", "repeats": "repeats", "depths": "depths",
    "logprobs": "logprobs", "host": "host", "port": "port", "plot": "plot", "parallel": "parallel", "rpc": "rpc",
}
_FIELD = re.compile(r"\{([a-z_]+)\}")


class SelfextError(Exception):
    """Base class of every error selfext raises on purpose."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.template = message

    def render(self, names: Mapping[str, str] | None = None) -> str:
        """The message with each ``{parameter}`` spelled as ``names`` says (else as the library spells it)."""
        names = names or {}

        def spell(m: re.Match[str]) -> str:
            key = m.group(1)
            return names.get(key, PARAMETERS[key]) if key in PARAMETERS else m.group(0)

        return _FIELD.sub(spell, self.template)

    def __str__(self) -> str:
        return self.render()


class LibraryError(SelfextError):
    """Our libllama could not be loaded, or the loaded one is not ours."""


class ModelError(SelfextError):
    """The model file is missing, unreadable, not a GGUF, or failed to load."""


class UnsupportedModelError(SelfextError):
    """Self-Extend cannot run exactly on this model."""


class ParameterError(SelfextError):
    """Invalid Self-Extend or generation parameters (the caller's mistake)."""


class CapacityError(SelfextError):
    """The text does not fit in the context that Self-Extend can reach with these parameters."""


class HubError(SelfextError):
    """A model could not be obtained from the Hugging Face Hub."""


class ServerError(SelfextError):
    """The server could not start: a missing dependency, or an address it cannot listen on."""


class RpcError(SelfextError):
    """An RPC server (``--rpc``) is unreachable, speaks another protocol, or was lost mid-run."""


class SlowPathWarning(UserWarning):
    """Self-Extend is on but runs its generic attention path, several times slower than the fused flash-attention
    op (flash attention is off on that context). ``load``, the server and the evaluation harnesses, which set flash
    attention themselves, do not raise it."""
