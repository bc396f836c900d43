"""Errors that reach users: each carries a one-line message that names the next thing to try."""

from __future__ import annotations


class SelfextError(Exception):
    """Base class of every error selfext raises on purpose."""

    exit_code = 1


class LibraryError(SelfextError):
    """Our libllama could not be loaded, or the loaded one is not ours."""


class ModelError(SelfextError):
    """The model file is missing, unreadable, not a GGUF, or failed to load."""


class UnsupportedModelError(SelfextError):
    """Self-Extend cannot run exactly on this model."""


class ParameterError(SelfextError):
    """Invalid Self-Extend or generation parameters."""

    exit_code = 2


class CapacityError(SelfextError):
    """The text does not fit in the context that Self-Extend can reach with these parameters."""


class HubError(SelfextError):
    """A model could not be obtained from the Hugging Face Hub."""


class ServerError(SelfextError):
    """The server could not start: a missing dependency, or an address it cannot listen on."""


class RpcError(SelfextError):
    """An RPC server (``--rpc``) is unreachable, speaks another protocol, or was lost mid-run."""
