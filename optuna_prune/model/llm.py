"""Chat language models that a search can consult (Self-Pruner): a local transformers model or an HTTP endpoint.

Both clients implement one method, ``complete(messages, max_tokens, temperature, seed) -> str``, the
interface :class:`~optuna_prune.search.samplers.selfpruner.SelfPrunerSampler` needs; anything with that
method (or a plain function taking the same arguments) plugs in. ``make_llm`` turns the ``--llm``
setting into a client:

* ``local:<model>``: :class:`TransformersChat`, a model ``optuna_prune.model.models.load_model`` knows
  (``local:smollm2-135m``, a checkpoint folder, a hub id). It is its own instance, loaded on first
  use: generation always runs on the dense weights, never on a model a fitness has masked or hooked.
* ``http://host:port/v1``: :class:`OpenAIChat`, an OpenAI-compatible server (vLLM, llama.cpp,
  TGI). Requests go to that URL only: environment proxies are ignored.
"""

from __future__ import annotations

import json
import logging
import os
import time
import urllib.error
import urllib.request
from typing import Any

_logger = logging.getLogger(__name__)

Messages = list[dict[str, str]]
API_KEY_ENV = "OPTUNA_PRUNE_LLM_API_KEY"
"""Environment variable with a bearer token for an OpenAI-compatible endpoint that needs one."""


class LLMError(RuntimeError):
    """The language model gave no answer (unreachable endpoint, HTTP error, malformed response)."""


class TransformersChat:
    """A local chat model run with transformers: chat template, then greedy or seeded sampling.

    Args:
        model: What ``load_model`` accepts (short name, folder, hub id); loaded on the first call.
        device, dtype: As for ``load_model`` (default: CUDA + bf16 when present, else CPU fp32).
    """

    def __init__(self, model: str = "smollm2-135m", device: str | None = None, dtype: str | None = None) -> None:
        self.name = model
        self._device = device
        self._dtype = dtype
        self._loaded: tuple[Any, Any] | None = None

    def __repr__(self) -> str:
        return f"TransformersChat({self.name!r})"

    def _model(self) -> tuple[Any, Any]:
        if self._loaded is None:
            # deferred: loads safetensors, torch, transformers only when this runs
            from optuna_prune.model.models import load_model

            self._loaded = load_model(self.name, device=self._device, dtype=self._dtype)
        return self._loaded

    def complete(self, messages: Messages, max_tokens: int = 64, temperature: float = 0.0, seed: int = 0) -> str:
        """The model's reply to ``messages``; ``temperature`` 0 is greedy, else sampling seeded by ``seed``."""
        # deferred: loads torch, transformers only when this runs
        import torch
        from transformers import GenerationConfig

        model, tokenizer = self._model()
        device = next(model.parameters()).device
        inputs = tokenizer.apply_chat_template(
            messages, add_generation_prompt=True, return_dict=True, return_tensors="pt"
        ).to(device)
        sample = temperature > 0
        config = GenerationConfig(
            max_new_tokens=max_tokens, do_sample=sample, temperature=temperature if sample else None,
            top_p=None, top_k=None, pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
        forked = [device] if device.type == "cuda" else []
        with torch.random.fork_rng(devices=forked), torch.inference_mode():
            torch.manual_seed(seed)
            out = model.generate(**inputs, generation_config=config)
        return tokenizer.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)


class OpenAIChat:
    """An OpenAI-compatible chat endpoint: ``POST {base_url}/chat/completions`` with the stdlib.

    Connection errors, timeouts, HTTP 429 and 5xx are retried ``retries`` times with exponential
    backoff (``backoff``, 2x, 4x ... seconds); other HTTP errors fail at once. Every failure is an
    :class:`LLMError` with a one-line message.

    Args:
        base_url: e.g. ``http://127.0.0.1:8000/v1`` (the part before ``/chat/completions``).
        model: The served model name (vLLM: ``--served-model-name``; llama.cpp ignores it).
        timeout: Seconds per request.
        api_key: Bearer token; default ``$OPTUNA_PRUNE_LLM_API_KEY`` if set.
    """

    def __init__(
        self,
        base_url: str,
        model: str | None = None,
        *,
        timeout: float = 60.0,
        retries: int = 2,
        backoff: float = 1.0,
        api_key: str | None = None,
    ) -> None:
        if not base_url.startswith(("http://", "https://")):
            raise ValueError(f"LLM endpoint {base_url!r} must start with http:// or https://")
        if timeout <= 0 or retries < 0 or backoff < 0:
            raise ValueError(f"LLM timeout {timeout} s must be > 0; retries={retries} and backoff={backoff} must be >= 0")
        self.base_url = base_url.rstrip("/")
        self.model = model
        self.timeout = float(timeout)
        self.retries = int(retries)
        self.backoff = float(backoff)
        self._api_key = api_key if api_key is not None else os.environ.get(API_KEY_ENV)
        # No ProxyHandler from the environment: requests go to the configured address only.
        self._opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))

    def __repr__(self) -> str:
        return f"OpenAIChat({self.base_url!r}, model={self.model!r})"

    def complete(self, messages: Messages, max_tokens: int = 64, temperature: float = 0.0, seed: int = 0) -> str:
        """The first choice's message content; LLMError after the retries are spent."""
        body: dict[str, Any] = {
            "messages": messages, "max_tokens": max_tokens, "temperature": temperature, "seed": seed,
        }
        if self.model:
            body["model"] = self.model
        headers = {"Content-Type": "application/json"}
        if self._api_key:
            headers["Authorization"] = f"Bearer {self._api_key}"
        url = f"{self.base_url}/chat/completions"
        request = urllib.request.Request(url, json.dumps(body).encode(), headers, method="POST")
        reason = ""
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(self.backoff * 2 ** (attempt - 1))
            try:
                with self._opener.open(request, timeout=self.timeout) as response:
                    return _content(json.loads(response.read().decode("utf-8")), url)
            except urllib.error.HTTPError as err:
                reason = f"HTTP {err.code} {err.reason}"
                if err.code != 429 and err.code < 500:
                    break
            except (urllib.error.URLError, TimeoutError, ConnectionError) as err:
                reason = str(getattr(err, "reason", err)) or type(err).__name__
            except (json.JSONDecodeError, UnicodeDecodeError):
                raise LLMError(f"LLM endpoint {url} answered with malformed JSON") from None
            _logger.debug("LLM request to %s failed (%s), attempt %d", url, reason, attempt + 1)
        raise LLMError(f"LLM endpoint {url} failed after {attempt + 1} tries: {reason}")


def _content(payload: Any, url: str) -> str:
    try:
        content = payload["choices"][0]["message"]["content"]
    except (KeyError, IndexError, TypeError):
        raise LLMError(f"LLM endpoint {url} answered without choices[0].message.content") from None
    if not isinstance(content, str):
        raise LLMError(f"LLM endpoint {url} answered with non-text content")
    return content


def make_llm(
    spec: str, model: str | None = None, timeout: float = 60.0, device: str | None = None
) -> TransformersChat | OpenAIChat:
    """The client ``--llm`` names: ``local:<model>`` or an ``http(s)://`` base URL (then ``model`` names it)."""
    if spec.startswith("local:") and spec[len("local:") :]:
        return TransformersChat(spec[len("local:") :], device=device)
    if spec.startswith(("http://", "https://")):
        return OpenAIChat(spec, model, timeout=timeout)
    raise ValueError(
        f"llm {spec!r} is neither local:<model> (e.g. local:smollm2-135m) nor an http(s):// endpoint "
        "(e.g. http://127.0.0.1:8000/v1)"
    )
